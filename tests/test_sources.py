"""Sources: the real GPT-2 path is exercised up to the download call; mistakes are one line."""

from __future__ import annotations

import pytest

from featstore import FeatstoreError
from featstore.sources.registry import get_source, stream_shard_index


class Recorder:
    """Stands in for a hub loader: records the call, then fails as an offline client does."""

    def __init__(self, exc: Exception | None = None, result=None) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.exc, self.result = exc, result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.exc is not None:
            raise self.exc
        return self.result


def test_unknown_source_lists_known_ones():
    with pytest.raises(FeatstoreError, match="unknown source 'nope'.*gpt2-small.*tiny"):
        get_source("nope")


def test_layer_without_sae_is_refused():
    with pytest.raises(FeatstoreError, match=r"no SAE for layer\(s\) \[12\]"):
        get_source("gpt2-small").check_layers([6, 12])


def test_gpt2_model_is_transformer_lens_gpt2(monkeypatch):
    from transformer_lens import HookedTransformer

    rec = Recorder(ConnectionError("Failed to resolve 'huggingface.co'"))
    monkeypatch.setattr(HookedTransformer, "from_pretrained", rec)
    with pytest.raises(FeatstoreError, match="cannot download model gpt2: no network"):
        get_source("gpt2-small").load_model()
    assert rec.calls[0][0] == ("gpt2",)


def test_gpt2_sae_is_saelens_res_jb(monkeypatch):
    from sae_lens import SAE

    rec = Recorder(OSError("We couldn't connect to 'https://huggingface.co'"))
    monkeypatch.setattr(SAE, "from_pretrained", rec)
    with pytest.raises(FeatstoreError, match="gpt2-small-res-jb/blocks.7.hook_resid_pre"):
        get_source("gpt2-small").load_sae(7)
    assert rec.calls[0][1] == {
        "release": "gpt2-small-res-jb",
        "sae_id": "blocks.7.hook_resid_pre",
        "device": "cpu",
    }


def test_real_saelens_call_offline_is_one_line(monkeypatch):
    """No mock: sae_lens resolves the release from its registry, then the download fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FeatstoreError) as info:
        get_source("gpt2-small").load_sae(8)
    assert "\n" not in str(info.value)
    assert "gpt2-small-res-jb/blocks.8.hook_resid_pre" in str(info.value)


def test_pile_is_streamed_through_datasets(monkeypatch):
    import datasets

    class Stream:
        def __init__(self) -> None:
            self.skipped = self.taken = None

        def skip(self, n):
            self.skipped = n
            return self

        def take(self, n):
            self.taken = n
            return iter([{"text": "hello"}])

    stream = Stream()
    rec = Recorder(result=stream)
    monkeypatch.setattr(datasets, "load_dataset", rec)
    texts = list(get_source("gpt2-small").load_texts("gpt2-small-00003"))
    assert texts == ["hello"]
    assert rec.calls[0] == (
        ("monology/pile-uncopyrighted",),
        {"split": "train", "streaming": True},
    )
    assert (stream.skipped, stream.taken) == (3 * 1024, 1024)


def test_stream_shard_names_are_checked():
    assert stream_shard_index("gpt2-small", "gpt2-small-00042") == 42
    with pytest.raises(FeatstoreError, match="expected gpt2-small-NNNNN"):
        stream_shard_index("gpt2-small", "shard-000")
