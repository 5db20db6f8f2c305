-- The co-activation sums of each feature of layer_a with one feature of layer_b, active together
-- on at least min_both tokens, from the merged pair statistics: every measure follows from them
-- and the features' own sums (the explorer's predecessors; reads 4 columns, not all).
--   featstore sql --file feature_predecessor_sums -p layer_a=6 -p layer_b=7 -p feature=123 -p min_both=1
SELECT feature_a, feature_b, n_both, sum_xy
FROM pair_stats
WHERE layer_a = $layer_a AND layer_b = $layer_b AND feature_b = $feature AND n_both >= $min_both
