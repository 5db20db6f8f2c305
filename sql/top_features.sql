-- The most frequent features of each layer: tokens fired on, share of all tokens, mean value.
--   featstore sql --file sql/top_features.sql -p top=10
WITH per_feature AS (
    SELECT layer, feature, count(*) AS n_active, avg(value) AS mean_value
    FROM activations
    GROUP BY layer, feature
),
per_layer AS (
    SELECT layer, sum(n_tokens) AS n_tokens
    FROM (SELECT DISTINCT layer, shard FROM activations) AS s
    JOIN (SELECT shard, count(*) AS n_tokens FROM tokens GROUP BY shard) AS t USING (shard)
    GROUP BY layer
)
SELECT
    layer,
    feature,
    n_active,
    n_active / n_tokens AS frequency,
    mean_value
FROM per_feature
JOIN per_layer USING (layer)
QUALIFY row_number() OVER (PARTITION BY layer ORDER BY n_active DESC, feature) <= $top
ORDER BY layer, n_active DESC, feature
