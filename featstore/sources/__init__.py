"""The sources wing: where activations come from.

- `registry`: the sources of `sources.yaml` (model, SAEs, text), read once into typed `Source`s.
- `extract`: tokenising text shards and storing their SAE codes.
- `tiny`: loaders of the embedded model and SAEs; `train_tiny`: the script that trains them.
- `generated`: sources of seeded random weights (`gpt2-random`) written on first use to a cache.
- `synth`: synthetic activations at GPT-2 scale with planted cross-layer edges; `planted`: the
  pass-through chains, gates and vanishing features it plants on request.

May import: the ground floor and the store wing.
"""
