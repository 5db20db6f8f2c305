"""The frozen pair query and the one place of defaults: validated fields, built in one call."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from importlib import resources

import pytest
import yaml

from featstore import defaults, settings
from featstore.analysis.causal import CausalConfig
from featstore.analysis.compare import CompareConfig
from featstore.cli import build_parser
from featstore.errors import FeatstoreError
from featstore.sources.extract import ExtractConfig
from featstore.sources.registry import default_layers
from featstore.sources.synth import SynthConfig
from featstore.stats import finish
from featstore.stats.query import PairQuery
from featstore.stats.shardsums import Variant
from featstore.store.sql import PAIR_STATS_SCHEMA


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("layer_a", -1),
        ("layer_b", "7"),
        ("layer_a", True),
        ("min_both", -1),
        ("min_both", 1.5),
        ("max_block_pairs", 0),
        ("engine", "numpy"),
        ("shards", "s0"),
        ("shards", ()),
        ("shards", ["s0", ""]),
        ("features_a", (5, 5)),
        ("features_b", (-1, 4)),
        ("features_a", (0, 2.5)),
        ("features_b", (1, 2, 3)),
        ("min_pearson", 1.5),
        ("min_jaccard", float("nan")),
        ("thresholds", {"sufficiency": 2.0}),
        ("thresholds", {"no_such_measure": 0.1}),
        ("thresholds", 3),
        ("variant", "null"),
        ("all_pairs", 1),
        ("save", "no"),
    ],
)
def test_a_bad_field_is_one_line_naming_it(field, value):
    fields = {"layer_a": 6, "layer_b": 7} | {field: value}
    with pytest.raises(FeatstoreError) as exc:
        PairQuery(**fields)
    message = str(exc.value)
    assert "\n" not in message
    named = "min_pearson" if field == "min_pearson" else field
    assert (
        named in message
        or (field == "thresholds" and "sufficiency" in message)
        or (field == "thresholds" and "no_such_measure" in message)
    )


def test_the_query_is_frozen_and_normalised():
    q = PairQuery(6, 7, shards=["s0", "s1"], features_a=[0, 4], thresholds=[("pmi", 1.0)])
    assert q.shards == ("s0", "s1") and q.features_a == (0, 4)
    assert dict(q.thresholds) == {"pmi": 1.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.min_both = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        q.thresholds["pmi"] = 0.0  # type: ignore[index]
    assert q.variant == Variant() == PairQuery(6, 7, variant=None).variant


def test_saves_only_the_whole_plain_table_unless_told():
    assert PairQuery(6, 7).saves and PairQuery(6, 7).whole_table
    null = {"variant": Variant(null=True)}
    for asked in ({"min_pearson": 0.2}, {"shards": ["s0"]}, null, {"all_pairs": True}):
        assert not PairQuery(6, 7, **asked).saves
    assert PairQuery(6, 7, min_pearson=0.2, save=True).saves
    assert not PairQuery(6, 7, save=False).saves


def test_the_cli_builds_the_query_in_one_call_with_every_flag():
    argv = [
        "stats", "--layer-a", "7", "--layer-b", "8", "--engine", "polars", "--shards", "a", "b",
        "--min-pearson", "0.3", "--min-jaccard", "0.1", "--features-a", "0:9",
        "--features-b", "2:5", "--all-pairs", "--min", "sufficiency=0.4", "--min", "pmi=1",
        "--min-both", "3", "--intervals", "--active-threshold", "0.5", "--null", "--save",
        "--relative-threshold", "0.2", "--no-bos",
        "--out", "o.parquet",
    ]  # fmt: skip
    args = build_parser().parse_args(argv)
    got = PairQuery.of(args, variant=settings.of(Variant, args))
    want = PairQuery(
        7, 8, shards=("a", "b"), features_a=(0, 9), features_b=(2, 5), all_pairs=True,
        min_pearson=0.3, min_jaccard=0.1, thresholds={"sufficiency": 0.4, "pmi": 1.0},
        min_both=3, intervals=True, engine="polars", save=True,
        variant=Variant(active_threshold=0.5, null=True, relative_threshold=0.2, bos=False),
    )  # fmt: skip
    assert got == want
    plain = PairQuery.of(build_parser().parse_args(["stats", "--layer-a", "6", "--layer-b", "7",
                                                    "--out", "o.parquet"]))  # fmt: skip
    assert plain == PairQuery(6, 7)


def test_layer_defaults_come_from_sources_yaml():
    text = (resources.files("featstore.sources") / "sources.yaml").read_text()
    entries = yaml.safe_load(text)
    tiny = tuple(entries[defaults.DEFAULT_SOURCE]["layers"])
    assert default_layers() == tiny
    assert ExtractConfig().layers == tiny
    assert CausalConfig().layers == tiny and CompareConfig().layers == tiny
    synth = entries[defaults.SYNTH_SOURCE]
    assert SynthConfig().layers == tuple(synth["layers"])
    assert SynthConfig().d_sae == synth["d_sae"]


def test_the_pair_table_has_one_schema():
    assert list(finish.SCHEMA) == list(defaults.PAIR_COLUMNS)
    assert PAIR_STATS_SCHEMA.names == [*defaults.PAIR_LAYERS, *defaults.PAIR_COLUMNS]
    assert [str(t) for t in PAIR_STATS_SCHEMA.types[:4]] == ["int32"] * 4


def test_settings_of_gives_a_frozen_config_tuples_for_lists():
    args = argparse.Namespace(layers=[6, 7], features=[3, 1], shards=None, max_sequences=2)
    cfg = settings.of(CausalConfig, args)
    assert cfg.layers == (6, 7) and cfg.features == (3, 1) and cfg.max_sequences == 2
    assert cfg.shards is None and cfg.min_tokens == settings.defaults(CausalConfig)["min_tokens"]
    hash(cfg)  # frozen and hashable: no list inside


@pytest.mark.parametrize(
    ("asset_config", "library"),
    [
        ("pipelines.assets.causal:CausalEdgesConfig",
         ["featstore.analysis.asked:EdgeChoice", "featstore.analysis.causal:CausalConfig"]),
        ("pipelines.assets.findings:FindingsAssetConfig",
         ["featstore.analysis.findings:FindingsConfig"]),
    ],
)  # fmt: skip
def test_asset_configs_show_the_library_defaults(asset_config, library):
    def load(name):
        module, attr = name.split(":")
        return getattr(importlib.import_module(module), attr)

    expect = {}
    for cls in map(load, library):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                expect[f.name] = f.default
    fields = load(asset_config).model_fields
    shared = [name for name in fields if name in expect]
    assert len(shared) >= 5
    for name in shared:
        default = fields[name].default
        assert default is None or default == expect[name], name
