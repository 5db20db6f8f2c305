"""The pair-statistics wing: exact cross-layer statistics of feature pairs.

From the bottom up:
- `compact`: a layer in the kernels' compact form (uint16 ids, float32 values: 6 bytes a
  nonzero), its feature-major side built per range of features.
- `kernel`: the compiled pass over two layers' activations (pair sums, counts, Pearson screen).
- `shardsums`: per-shard pair sums saved in the store and merged (incremental recomputation).
- `scan`: scanning a layer pair's shards block by block.
- `finish`: turning sums into statistics and applying a query's threshold rules.
- `measures`: every measure's definition, ranges and intervals.
- `pairquery`: `PairQuery`, the frozen question (layers, shards, features, thresholds, variant,
  engine, saving) that `query` answers; the CLI and Dagster build it in one call.
- `query`: `pair_stats`/`pair_report`, the public entry points.
- `best`: each feature's best partner by one measure, block by block (no features x features).
- `allpairs`: `pair_reports`, every pair among some layers in one pass over the shards.

May import: the ground floor and the store wing.
"""
