"""Every pipeline stage (`featstore.stages.STAGES`) at GPT-2 small's dimensions, in one process:
the helper that tests/test_gpt2_dims.py runs as a subprocess, so that the peak memory it reports
is the pipeline's own.

    python tests/gpt2_dims.py HOME RESULT.json

The model and SAEs are the `gpt2-random` source's, built here from its seeds instead of read from
the generated cache (building that takes minutes): GPT-2 small's blocks (d_model 768, 12 heads,
d_mlp 3072, vocabulary 50,257) cut to the 9 the hooks at layers 6-8 need, and three of its
24,576-feature SAEs (layers 6-8: two adjacent pairs, three at distances 1-2, keep the test near
its time), their encoder biases calibrated for L0 ~60 on a few sequences of each text shard. Every
stage gets them through `featstore.sources.extract.load_model_and_saes` (the model stages) and
`featstore.analysis.decoders.load_decoder` (decoder cosines); generating the source on disk is
refused, so a stage that loads it another way fails here instead of taking minutes.
RESULT.json: one row per stage (seconds, peak RSS of this process so far, what it made).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

LAYERS = (6, 7, 8)
CALIBRATION_SEQUENCES = 8  # per text shard: ~3,000 tokens, ~7 firing tokens a feature
# Small samples of the costly analyses: the point is that each runs at these dimensions.
PLAN = {
    "source": "gpt2-random",
    "layers": LAYERS,
    "max_sequences": 3,  # per text shard: 3 shards x 3 x 128 = 1,152 tokens a layer
    "batch_size": 3,
    "threshold": 0.2,
    "causal_sequences": 1,
    "causal_edges": 3,
    "causal_random": 2,
    "erasure_sequences": 1,
    "cards": 2,
}


def rehearsal():
    """The gpt2-random model (9 blocks) and SAEs of layers 6-8, built in memory from seeds."""
    from featstore.sources import generated
    from featstore.sources.registry import get_source

    source = get_source("gpt2-random")
    model = generated.make_model(source, n_layers=max(LAYERS) + 1)
    x = generated.calibration_residuals(source, model, CALIBRATION_SEQUENCES, LAYERS)
    return model, {layer: generated.make_sae(source, x[layer], layer) for layer in LAYERS}


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main(home: str, result: str) -> None:
    import torch

    from featstore import stages
    from featstore.analysis import decoders
    from featstore.errors import FeatstoreError
    from featstore.sources import extract, generated
    from featstore.store.home import open_store

    torch.set_num_threads(2)
    start = time.perf_counter()
    model, saes = rehearsal()
    rows = [{"stage": "build model and SAEs", "seconds": time.perf_counter() - start,
             "peak_gb": peak_gb(), "made": f"d_model {model.cfg.d_model}, d_sae "
             f"{saes[LAYERS[0]].cfg.d_sae}"}]  # fmt: skip

    def load_model_and_saes(cfg, layers=None):
        return model, {layer: saes[layer] for layer in sorted(layers or cfg.layers)}

    def load_decoder(source, layer):
        return saes[layer].W_dec.detach().float().numpy()

    def no_generation(source):
        raise FeatstoreError(f"the rehearsal must not generate source {source.name} on disk")

    extract.load_model_and_saes = load_model_and_saes  # what every model stage calls
    decoders.load_decoder = load_decoder
    generated.source_folder = no_generation
    plan = stages.Plan(**PLAN)
    store = open_store(Path(home), create=True)
    for name, stage in stages.STAGES.items():
        start = time.perf_counter()
        made = stage(store, plan)
        rows.append({"stage": name, "seconds": time.perf_counter() - start,
                     "peak_gb": peak_gb(), "made": made})  # fmt: skip
        print(f"{name:<16} {rows[-1]['seconds']:6.1f} s {rows[-1]['peak_gb']:5.2f} GB  {made}",
              flush=True)  # fmt: skip
        Path(result).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
