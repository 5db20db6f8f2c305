"""Activation patching of asked edges: effects equal plain transformer_lens hooks; batching
changes nothing; only the asked columns are read; every tensor is made on the model's device."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from helpers import one_torch_thread, random_model, random_saes, random_tokens
from torch.overrides import TorchFunctionMode

from featstore.analysis.attribution import edge_attribution
from featstore.analysis.columns import encode_columns
from featstore.analysis.patching import Edges, PatchConfig, edge_effects, row_batches
from featstore.analysis.steering import SteerConfig, steer
from featstore.errors import FeatstoreError
from featstore.sources.extract import encode_batch

DEAD = 5  # a feature of layer 6 that never fires


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


@pytest.fixture(scope="module")
def setup():
    model = random_model()
    tokens = random_tokens(n_seq=6, seq_len=12)
    saes = random_saes(model, tokens)
    with torch.no_grad():
        saes[6] = copy.deepcopy(saes[6])
        saes[6].b_enc[DEAD] = -1e4
    codes = encode_batch(model, {6: saes[6]}, {6: name(6)}, torch.as_tensor(tokens))[6]
    return model, saes, tokens, codes


def all_targets(target: int, features, d: int = 64) -> Edges:
    """Every (feature, j) pair of `features` x all j of the target layer."""
    return Edges.of(target, np.repeat(features, d), np.tile(np.arange(d), len(features)))


def reference(model, saes, tokens, layer, target, feature, value=0.0):
    """Patch with our own hook over the whole batch; mean effect, off/on counts, tokens."""
    sae, seen = saes[layer], {}

    def hook(resid, hook):
        a = sae.encode(resid)[..., feature]
        active = a > 0
        active[:, 0] = False
        seen["mask"] = active
        return resid + torch.where(active, value - a, 0.0)[..., None] * sae.W_dec[feature]

    x = torch.as_tensor(tokens)
    with torch.no_grad():
        _, clean = model.run_with_cache(x, names_filter=name(target))
        model.run_with_hooks(
            x,
            fwd_hooks=[(name(layer), hook), (name(target), lambda r, hook: seen.update(p=r))],
        )
        before = saes[target].encode(clean[name(target)])
        after = saes[target].encode(seen["p"])
    m = seen["mask"]
    diff = (after - before)[m]
    off = ((before > 0) & (after <= 0))[m].sum(0)
    on = ((before <= 0) & (after > 0))[m].sum(0)
    return diff.mean(0).numpy(), off.numpy(), on.numpy(), int(m.sum())


# -- reading only the asked columns --------------------------------------------------------------


def test_encode_columns_equals_the_saes_own_encode(setup):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    model, saes, tokens, _ = setup
    x = torch.randn(3, 5, 32)
    cols = torch.as_tensor([40, 2, 7, 63])
    jump = JumpReLUSAE(JumpReLUSAEConfig(d_in=32, d_sae=64)).eval()
    with torch.no_grad():
        jump.W_enc.normal_()
        jump.threshold.uniform_(0, 1.0)
        mine, theirs = encode_columns(saes[7], x, cols), saes[7].encode(x)[..., cols]
        np.testing.assert_allclose(mine, theirs, atol=1e-6)
        got, expect = encode_columns(jump, x, cols), jump.encode(x)[..., cols]
    np.testing.assert_allclose(got, expect, atol=1e-6)
    assert (got > 0).any() and (got == 0).any()


def test_an_sae_without_a_per_feature_encoding_is_refused(setup):
    from sae_lens import TopKSAE, TopKSAEConfig

    model, saes, tokens, codes = setup
    topk = {**saes, 7: TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4)).eval()}
    with pytest.raises(FeatstoreError, match="layer 7 .*feature by feature"):
        edge_effects(model, topk, tokens, codes, PatchConfig(6), [all_targets(7, [3])])


# -- exact patching ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [pytest.param(0.0, id="ablate"), pytest.param(2.5, id="clamp")])
def test_one_patch_equals_a_plain_hook_computation(setup, value):
    model, saes, tokens, codes = setup
    asked = [Edges.of(7, [3, 3, 11, 11, 11], [0, 50, 2, 9, 50]), all_targets(9, [3, 11])]
    cfg = PatchConfig(layer=6, value=value, batch_rows=5)
    sums = edge_effects(model, saes, tokens, codes, cfg, asked)
    for edges, s in zip(asked, sums, strict=True):
        for feature in (3, 11):
            mean, off, on, n = reference(model, saes, tokens, 6, edges.target, feature, value)
            mine = edges.feature_a == feature
            j = edges.feature_b[mine]
            assert (s.n_tokens[mine] == n).all() and n > 0
            np.testing.assert_allclose(s.effect[mine] / n, mean[j], atol=1e-5)
            np.testing.assert_array_equal(s.n_off[mine], off[j])
            np.testing.assert_array_equal(s.n_on[mine], on[j])


def test_a_feature_that_never_fires_changes_nothing(setup):
    model, saes, tokens, codes = setup
    assert codes[:, DEAD].nnz == 0
    (both,) = edge_effects(model, saes, tokens, codes, PatchConfig(6), [all_targets(8, [3, DEAD])])
    (alone,) = edge_effects(model, saes, tokens, codes, PatchConfig(6), [all_targets(8, [3])])
    dead = slice(64, 128)  # DEAD > 3: its edges come second
    for field in ("n_tokens", "effect", "total", "clean", "n_clean_on", "n_off", "n_on"):
        assert not getattr(both, field)[dead].any()
        np.testing.assert_array_equal(getattr(both, field)[:64], getattr(alone, field))


def test_batching_and_memory_limits_change_nothing(setup):
    model, saes, tokens, codes = setup
    asked = [all_targets(7, [0, 3, 7, 40]), Edges.of(8, [0, 7, 7, 40], [1, 1, 30, 63])]
    together = edge_effects(model, saes, tokens, codes, PatchConfig(6, batch_rows=64), asked)
    small = PatchConfig(6, batch_rows=3, max_cells=12 * 70)
    apart = edge_effects(model, saes, tokens, codes, small, asked)
    for a, b in zip(together, apart, strict=True):
        np.testing.assert_array_equal(a.n_tokens, b.n_tokens)
        np.testing.assert_allclose(a.effect, b.effect, atol=1e-5)
        np.testing.assert_allclose(a.total, b.total, atol=1e-5)
        np.testing.assert_array_equal(a.n_off, b.n_off)


@pytest.mark.parametrize("seed", range(3))
def test_edges_of_rows_and_batches_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    edges = Edges.of(9, rng.integers(0, 20, 60), rng.integers(0, 30, 60))
    feats = rng.integers(0, 25, 40)
    rows, ids = edges.of_rows(feats)
    expect = {(r, e) for r, f in enumerate(feats) for e in range(len(edges))
              if edges.feature_a[e] == f}
    assert set(zip(rows.tolist(), ids.tolist(), strict=True)) == expect
    widths = np.bincount(rows, minlength=len(feats))
    cfg = PatchConfig(6, batch_rows=7, max_cells=400)
    parts = list(row_batches(widths, 5, cfg))
    assert np.concatenate([np.arange(len(feats))[p] for p in parts]).tolist() == list(range(40))
    for p in parts:
        n = p.stop - p.start
        assert n <= 7 and (n == 1 or n * 5 * widths[p].sum() <= 400)


def test_edges_out_of_range_are_refused(setup):
    model, saes, tokens, codes = setup
    for bad in (Edges.of(7, [64], [0]), Edges.of(7, [0], [-1]), Edges.of(6, [0], [0])):
        with pytest.raises(FeatstoreError, match="must lie"):
            edge_effects(model, saes, tokens, codes, PatchConfig(6), [bad])


# -- attribution ---------------------------------------------------------------------------------


def test_attribution_is_the_directional_derivative_of_the_patch(setup):
    model, saes, tokens, codes = setup
    feature, target = 11, 9
    js = np.array([0, 4, 17, 33, 63])
    edges = [Edges.of(target, [feature] * 5 + [3], [*js, 4])]
    cfg = PatchConfig(6)
    (est,) = edge_attribution(model, saes, tokens, codes, cfg, edges, batch_sequences=4, chunk=2)
    x = torch.as_tensor(tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=name(6))
    resid = cache[name(6)]
    a = torch.as_tensor(codes[:, feature].toarray().reshape(tokens.shape), dtype=torch.float32)
    a[:, 0] = 0
    tangent = (-a)[..., None] * saes[6].W_dec[feature].detach()

    def downstream(r):
        out = model(r, start_at_layer=6, stop_at_layer=target)
        return saes[target].encode(out)[:, 1:].sum((0, 1))

    _, jvp = torch.autograd.functional.jvp(downstream, resid, tangent)
    mine = edges[0].feature_a == feature
    np.testing.assert_allclose(est[mine], jvp.numpy()[js], rtol=1e-3, atol=1e-4)


# -- every tensor on the model's device ----------------------------------------------------------

FACTORIES = {torch.as_tensor, torch.tensor, torch.zeros, torch.ones, torch.arange, torch.eye,
             torch.full, torch.empty, torch.randn, torch.rand}


class DeviceWatch(TorchFunctionMode):
    """Records featstore's tensor creations without a device, `from_numpy` (always on the
    host), and `.numpy()` of a tensor not passed through `.cpu()` first: each would combine host
    and device tensors, or fail, on `cuda`."""

    def __init__(self):
        super().__init__()
        self.problems: list[str] = []
        self.on_host: dict[int, torch.Tensor] = {}  # by id, held so that ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        caller = sys._getframe(1)
        where = f"{caller.f_globals.get('__name__')}:{caller.f_lineno}"
        if not where.startswith("featstore."):
            return out
        if (func in FACTORIES and kwargs.get("device") is None) or func is torch.from_numpy:
            self.problems.append(f"{where} {func.__name__} without a device")
        if func is torch.Tensor.cpu:
            self.on_host[id(out)] = out
        if func is torch.Tensor.numpy and id(args[0]) not in self.on_host:
            self.problems.append(f"{where} .numpy() without .cpu()")
        return out


def test_every_tensor_is_made_on_the_models_device(setup):
    model, saes, tokens, codes = setup
    asked = [all_targets(7, [3, 11]), Edges.of(9, [0, 3], [5, 6])]
    watch = DeviceWatch()
    with watch:
        edge_effects(model, saes, tokens, codes, PatchConfig(6, batch_rows=4), asked)
        edge_attribution(model, saes, tokens, codes, PatchConfig(6), asked, chunk=8)
        steer(model, saes, tokens, np.full(64, 0.5), SteerConfig(6, (3,), targets=(8,)))
    assert watch.problems == []


def test_the_device_watch_sees_a_host_tensor():
    watch = DeviceWatch()
    with watch:
        exec("import torch; torch.zeros(3).numpy()", {"__name__": "featstore.fake"})
    assert len(watch.problems) == 2
