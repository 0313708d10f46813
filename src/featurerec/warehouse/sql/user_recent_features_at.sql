-- Each user's last $n distinct features as of $as_of, straight from the events: the same
-- ranking as ml.user_recent_features (latest use in the interaction window, ties by feature
-- name), for an earlier cut. Training uses it for its validation split, so the sequence
-- signal of the "before" side does not see which features users used after the cut.
--
-- Params: $as_of TIMESTAMP, $days INTEGER (settings.windows.interaction_days),
--         $n INTEGER (settings.windows.recent_features).
WITH last_use AS (
    SELECT
        e.user_id,
        e.feature_category AS feature,
        MAX(e.timestamp)   AS last_used
    FROM events e
    WHERE e.event_type = 'feature_used'
      AND e.feature_category IS NOT NULL
      AND e.timestamp >= CAST($as_of AS DATE) - $days * INTERVAL '1' DAY
      AND e.timestamp <= $as_of
    GROUP BY e.user_id, e.feature_category
),
ranked AS (
    SELECT
        user_id,
        feature,
        ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY last_used DESC, feature) AS recency_rank
    FROM last_use
)
SELECT user_id, feature, recency_rank
FROM ranked
WHERE recency_rank <= $n
ORDER BY user_id, recency_rank DESC
