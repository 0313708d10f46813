-- ml.user_recent_features: each user's last $n distinct features, for the sequence model.
--
-- Read from ml.user_feature_interactions (its last_used is the user's latest use of the
-- feature inside the interaction window), so it shares that window and as-of time.
-- recency_rank 1 is the most recent feature; ties on last_used break by feature name.
--
-- Params: $n INTEGER (settings.windows.recent_features).
WITH ranked AS (
    SELECT
        user_id,
        feature,
        last_used,
        ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY last_used DESC, feature) AS recency_rank
    FROM ml.user_feature_interactions
)
SELECT user_id, feature, last_used, recency_rank
FROM ranked
WHERE recency_rank <= $n
ORDER BY user_id, recency_rank
