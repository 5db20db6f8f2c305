"""The findings asset: the study's conjectures C1-C3a answered, with intervals and verdicts."""

# No `from __future__ import annotations`: Dagster reads the context, config and resource
# annotations at definition time and needs the real classes, not strings.
from typing import Any

import dagster as dg

from featstore import settings
from featstore.analysis.findings import FindingsConfig, run_findings, source_of
from featstore.errors import FeatstoreError
from featstore.sources.extract import load_model_and_saes
from featstore.store.spec import FINDINGS_DIR
from pipelines.assets.statistics import EAGER, inline_png, pair_stats
from pipelines.execution import MODEL_STEP
from pipelines.resources import FeatstoreResource

FINDINGS_VERSION = "1"


# The library's defaults, named once (FindingsConfig); the asset only exposes them.
_DEFAULT = settings.defaults(FindingsConfig)


class FindingsAssetConfig(dg.Config):
    gate_threshold: float = _DEFAULT["gate_threshold"]  # necessity / sufficiency of a partner
    gate_min_both: int = _DEFAULT["gate_min_both"]  # tokens a gate partner shares with it
    pass_pearson: float = _DEFAULT["pass_pearson"]  # pass-through: mutual best match at least
    vanishing_necessity: float = _DEFAULT["vanishing_necessity"]  # vanishing: best necessity
    n_boot: int = _DEFAULT["n_boot"]  # bootstrap resamples of each interval
    max_sequences: int = _DEFAULT["max_sequences"]  # per shard, for C3a's forward passes
    max_features: int = _DEFAULT["max_features"]  # vanishing features and controls, for C3a
    seed: int = _DEFAULT["seed"]


@dg.asset(
    deps=[pair_stats],
    code_version=FINDINGS_VERSION,
    group_name="findings",
    kinds={"polars", "matplotlib"},
    automation_condition=EAGER,  # regenerated when the pair statistics change
    **MODEL_STEP,  # C3a runs the model, as extraction
)
def findings(config: FindingsAssetConfig, featstore: FeatstoreResource) -> dg.MaterializeResult:
    """C1-C3a of the study: per conjecture the statistic, its 95% bootstrap interval against a
    null or control, and a verdict (supported / not supported / inconclusive) by the rule of
    docs/FINDINGS.md, with the plot behind it. The verdicts are about the configured source
    (on `tiny`: about tiny, not GPT-2). `featstore.analysis.findings.run_findings`: the table
    (the `findings` SQL view), the page and the PNGs under `{home}/findings/`.
    """
    cfg = settings.of(FindingsConfig, config, layers=tuple(featstore.layers))
    store = featstore.open()
    model, saes = None, None  # C3a says when it has no model to run
    if source_of(store, cfg.layers[0]) == featstore.source:  # the model the store came from
        try:
            model, saes = load_model_and_saes(featstore.extract_config())
        except FeatstoreError:  # e.g. no network for the hub
            pass
    out = featstore.home_path() / FINDINGS_DIR
    frame, paths = run_findings(store, cfg, out, model, saes)
    metadata: dict[str, Any] = {
        "page": dg.MetadataValue.md(paths["findings_page"].read_text(encoding="utf-8")),
        "verdicts": dg.MetadataValue.json(dict(zip(
            [f"{c} #{i}" for i, c in enumerate(frame["conjecture"])], frame["verdict"],
            strict=True))),
        "table": dg.MetadataValue.path(str(paths["findings"])),
        "dagster/row_count": frame.height,
    }  # fmt: skip
    metadata |= {name: inline_png(p) for name, p in paths.items() if p.suffix == ".png"}
    return dg.MaterializeResult(metadata=metadata)


findings_assets = [findings]
