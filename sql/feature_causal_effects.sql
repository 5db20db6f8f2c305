-- The measured causal effects of ablating one feature of a layer on later features, and of
-- earlier features on it (featstore.analysis.causal), strongest first.
--   featstore sql --file feature_causal_effects -p layer=7 -p feature=123
SELECT *
FROM causal_edges
WHERE (layer_a = $layer AND feature_a = $feature) OR (layer_b = $layer AND feature_b = $feature)
ORDER BY abs(relative_effect) DESC NULLS LAST
