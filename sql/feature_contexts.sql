-- The strongest activations of one feature, each with the text around it (5 tokens before,
-- 2 after) in its sequence.
--   featstore sql --file sql/feature_contexts.sql -p layer=6 -p feature=123 -p top=20
WITH hits AS (
    SELECT shard, seq, pos, value
    FROM activations
    WHERE layer = $layer AND feature = $feature
    ORDER BY value DESC
    LIMIT $top
)
SELECT
    h.shard,
    h.seq,
    h.pos,
    h.value,
    string_agg(coalesce(t.text, '<' || t.token || '>'), '' ORDER BY t.pos)
        FILTER (WHERE t.pos < h.pos) AS before,
    any_value(t.text) FILTER (WHERE t.pos = h.pos) AS token_text,
    string_agg(coalesce(t.text, '<' || t.token || '>'), '' ORDER BY t.pos)
        FILTER (WHERE t.pos > h.pos) AS after
FROM hits AS h
JOIN tokens AS t
    ON t.shard = h.shard AND t.seq = h.seq AND t.pos BETWEEN h.pos - 5 AND h.pos + 2
GROUP BY h.shard, h.seq, h.pos, h.value
ORDER BY h.value DESC
