"""The code location: assembles assets, checks, resources and sensors; nothing else lives here."""

from __future__ import annotations

import dagster as dg

from pipelines import beta
from pipelines.assets.causal import causal_assets
from pipelines.assets.checks import activation_checks
from pipelines.assets.comparison import comparison_assets
from pipelines.assets.extraction import activations, encoder_config, tokenizer_config, tokens
from pipelines.assets.findings import findings_assets
from pipelines.assets.statistics import statistics_assets
from pipelines.execution import executor
from pipelines.removal import merge_after_removal
from pipelines.resources import FeatstoreResource, from_env
from pipelines.sensors import automation, new_text_shards


def build_defs(featstore: FeatstoreResource) -> dg.Definitions:
    """The code location around one store and extraction configuration."""
    defs = dg.Definitions(
        assets=[
            tokenizer_config,
            encoder_config,
            tokens,
            activations,
            *statistics_assets,
            *causal_assets,
            *comparison_assets,
            *findings_assets,
        ],
        asset_checks=activation_checks,
        resources={"featstore": featstore},
        sensors=[new_text_shards, automation, merge_after_removal],
        executor=executor(),
    )

    # Dagster builds the repository lazily and, doing so, passes a sensor's beta `owners` to
    # itself (a BetaWarning no user can act on): built here, once (it is cached), without it.
    with beta.on_purpose():
        defs.get_repository_def()
    return defs

defs = build_defs(from_env())  # FEATSTORE_HOME, _SOURCE, _TEXT_DIR, _LAYERS, ... (README)
