-- Every pair of one feature of layer_a with the features of layer_b, from the merged pair
-- statistics (the explorer's successors of a feature).
--   featstore sql --file feature_successors -p layer_a=6 -p layer_b=7 -p feature=123
SELECT *
FROM pair_stats
WHERE layer_a = $layer_a AND layer_b = $layer_b AND feature_a = $feature
