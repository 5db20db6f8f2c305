"""The analysis wing: what is built on the pair statistics.

`graph` (the feature graph), `plots` and `causal_plots` (figures), `decoders` (data-free
decoder cosine), `asked` (which edges a causal run measures), `columns` (a few features of an
SAE's encoding), `patching` and `attribution` (exact and first-order patching of asked edges),
`causal` (causal edges vs the correlation graph, ablation by similarity bin), `steering`
(clamped features: KL, tokens gained and lost, later features), `compare` (measures
and methods compared), `concepts` (concept tracing), `erasure` (gradual change and erasure),
`cards` (feature cards), `logits` (logit effects: what each decoder direction promotes and
suppresses), `passthrough` (pass-through features and chains), `gates` (AND/OR gates),
`vanishing` (features without a successor, and their decoder direction in the next SAE's error),
`convergence` (statistics as shards are added).

May import: the ground floor and the store, sources and stats wings; a module here imports
another of this wing only for that module's own idea (the graph, patching), never for a helper.
"""
