"""The findings asset: the study's conjectures C1-C3a answered, with intervals and verdicts."""

# No `from __future__ import annotations`: Dagster reads the context, config and resource
# annotations at definition time and needs the real classes, not strings.
from typing import Any

import dagster as dg

from featstore.analysis.findings import FindingsConfig, run_findings, source_of
from featstore.errors import FeatstoreError
from featstore.sources.extract import load_model_and_saes
from featstore.store.spec import FINDINGS_DIR
from pipelines.assets.statistics import EAGER, inline_png, pair_stats
from pipelines.execution import MODEL_STEP
from pipelines.resources import FeatstoreResource

FINDINGS_VERSION = "1"


class FindingsAssetConfig(dg.Config):
    gate_threshold: float = 0.999  # necessity / sufficiency of a gate partner (spar-2024)
    gate_min_both: int = 10  # tokens a gate partner must share with the later feature
    pass_pearson: float = 0.95  # pass-through: mutual best match at or above this
    vanishing_necessity: float = 0.4  # vanishing: best necessity at or below this
    n_boot: int = 1000  # bootstrap resamples of each interval
    max_sequences: int = 16  # per shard, for C3a's forward passes
    max_features: int = 200  # vanishing features and controls each, for C3a
    seed: int = 0


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
    cfg = FindingsConfig(
        layers=tuple(featstore.layers),
        gate_threshold=config.gate_threshold,
        gate_min_both=config.gate_min_both,
        pass_pearson=config.pass_pearson,
        vanishing_necessity=config.vanishing_necessity,
        n_boot=config.n_boot,
        seed=config.seed,
        max_sequences=config.max_sequences,
        max_features=config.max_features,
    )
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
