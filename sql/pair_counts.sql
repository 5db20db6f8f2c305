-- Per-shard sufficient statistics of every co-active feature pair of two layers: the same
-- numbers as featstore.pairs' sparse and polars engines (`featstore stats --engine duckdb`).
--   n_both: tokens where both features are > 0 (only nonzeros are stored, so: joined rows)
--   sum_xy: sum over those tokens of the product of the two activations
-- Parameters: $layer_a, $layer_b, $shard. From the shell:
--   featstore sql --file sql/pair_counts.sql -p layer_a=6 -p layer_b=7 -p shard=NAME
SELECT
    a.feature AS feature_a,
    b.feature AS feature_b,
    count(*) AS n_both,
    sum(a.value::DOUBLE * b.value::DOUBLE) AS sum_xy
FROM activations AS a
JOIN activations AS b
    ON a.shard = b.shard AND a.seq = b.seq AND a.pos = b.pos
WHERE a.layer = $layer_a AND b.layer = $layer_b AND a.shard = $shard AND b.shard = $shard
GROUP BY a.feature, b.feature
ORDER BY feature_a, feature_b
