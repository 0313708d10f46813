-- Spec Stage 7 monitoring metrics. Every window is ($start, $as_of] relative to an as-of
-- time, never the wall clock. Parameters are bound.

-- name: click_through_rate
-- recommendations clicked / recommendations shown (served), generated in the window.
SELECT COUNT(*) AS n,
       COUNT(c.recommendation_id) AS hits
FROM ml.recommendation_log r
LEFT JOIN ml.recommendation_clicks c
  ON c.recommendation_id = r.recommendation_id AND c.click_timestamp <= $as_of
WHERE r.generated_at > $start AND r.generated_at <= $as_of;

-- name: feature_adoption_after_rec
-- users who used a recommended feature within 7 days / users shown a recommendation.
-- The cohort is users shown a recommendation in ($start, $end] with $end = $as_of - 7 days,
-- so every counted recommendation has had its full 7 days (no undercount of fresh ones).
SELECT COUNT(*) AS n,
       COALESCE(SUM(adopted), 0) AS hits
FROM (
    SELECT user_id, MAX(adopted_7d) AS adopted
    FROM ml.recommendation_feedback
    WHERE generated_at > $start AND generated_at <= $end
    GROUP BY user_id
);

-- name: time_to_first_use
-- median hours from a recommendation to the first use of its feature (adopted within 30 d).
SELECT COUNT(*) AS n,
       quantile_cont(EXTRACT(EPOCH FROM (first_use_timestamp - generated_at)) / 3600.0, 0.5)
           AS value
FROM ml.recommendation_feedback
WHERE generated_at > $start AND generated_at <= $as_of
  AND first_use_timestamp IS NOT NULL
  AND adopted_30d = 1;

-- name: recommendation_diversity
-- per user: unique features recommended / recommendations, in the window; mean over users.
SELECT COUNT(*) AS n, AVG(ratio) AS value
FROM (
    SELECT user_id, COUNT(DISTINCT recommended_feature) * 1.0 / COUNT(*) AS ratio
    FROM ml.recommendation_log
    WHERE generated_at > $start AND generated_at <= $as_of
    GROUP BY user_id
);

-- name: novelty_score
-- mean over recommendations of (1 - usage share of the recommended feature), where the
-- usage share of f = users who used f / users who used any feature, over the 30 days
-- before $as_of. A never-used feature has novelty 1; a feature everyone uses has 0.
WITH active AS (
    SELECT user_id, feature_category AS feature
    FROM events
    WHERE feature_category IS NOT NULL
      AND timestamp > $as_of - INTERVAL 30 DAY AND timestamp <= $as_of
),
total AS (SELECT COUNT(DISTINCT user_id) AS users FROM active),
share AS (
    SELECT feature, COUNT(DISTINCT user_id) * 1.0 / NULLIF((SELECT users FROM total), 0) AS s
    FROM active GROUP BY feature
)
SELECT COUNT(*) AS n, AVG(1.0 - COALESCE(share.s, 0.0)) AS value
FROM ml.recommendation_log r
LEFT JOIN share ON share.feature = r.recommended_feature
WHERE r.generated_at > $start AND r.generated_at <= $as_of;

-- name: coverage_counts
-- recommendations per feature in the window (coverage = features with >= 1% / all features).
SELECT recommended_feature AS feature, COUNT(*) AS n
FROM ml.recommendation_log
WHERE generated_at > $start AND generated_at <= $as_of
GROUP BY recommended_feature;

-- name: all_features
-- the item space: every feature seen in product events or recommended.
SELECT DISTINCT feature_category AS feature FROM events WHERE feature_category IS NOT NULL
UNION
SELECT DISTINCT recommended_feature FROM ml.recommendation_log;
