-- Spec Stage 7 "Feedback Collection Pipeline", adapted.
--
-- Differences from the spec's INSERT ... WHERE recommendation_id NOT IN (...):
--  * rows whose 30-day attribution window is still open at $as_of (plus $grace_days for
--    late-arriving events) are recomputed: deleted and re-inserted in one transaction, so a
--    click or first use that lands late is picked up, and a rerun changes nothing;
--  * only feedback that happened by $as_of counts (a report "as of T" is reproducible);
--  * the first use must come AFTER the recommendation was generated (a feature the user had
--    already adopted is not credited to the recommendation);
--  * dismissals and 30-day adoption are tracked too;
--  * promoted event columns (feature_category, is_first_use) replace JSON_EXTRACT_SCALAR.
--
-- Parameters: $as_of (TIMESTAMP), $window_start (TIMESTAMP: $as_of - (30 + grace) days).

-- name: delete_open
DELETE FROM ml.recommendation_feedback
WHERE generated_at >= $window_start
  AND generated_at <= $as_of;

-- name: insert
INSERT INTO ml.recommendation_feedback (
    recommendation_id, user_id, recommended_feature, score, position, placement, strategy,
    experiment, variant, propensity, generated_at, clicked, click_timestamp, dismissed,
    adopted_7d, adopted_30d, first_use_timestamp
)
WITH recs AS (
    SELECT r.*
    FROM ml.recommendation_log r
    WHERE r.generated_at <= $as_of
      AND (
          r.generated_at >= $window_start
          OR NOT EXISTS (
              SELECT 1 FROM ml.recommendation_feedback f
              WHERE f.recommendation_id = r.recommendation_id
          )
      )
),
clicks AS (
    SELECT c.recommendation_id, c.click_timestamp
    FROM ml.recommendation_clicks c
    WHERE c.click_timestamp <= $as_of
),
dismissals AS (
    SELECT recommendation_id, MIN(timestamp) AS dismiss_timestamp
    FROM ml.recommendation_events
    WHERE kind = 'dismiss' AND timestamp <= $as_of
    GROUP BY recommendation_id
),
first_uses AS (
    SELECT e.user_id, e.feature_category AS feature, e.timestamp
    FROM events e
    WHERE e.is_first_use
      AND e.feature_category IS NOT NULL
      AND e.timestamp <= $as_of
      AND e.user_id IN (SELECT DISTINCT user_id FROM recs)
),
first_use_after_rec AS (
    SELECT r.recommendation_id, MIN(u.timestamp) AS first_use_timestamp
    FROM recs r
    JOIN first_uses u
      ON u.user_id = r.user_id
     AND u.feature = r.recommended_feature
     AND u.timestamp >= r.generated_at
    GROUP BY r.recommendation_id
)
SELECT
    r.recommendation_id,
    r.user_id,
    r.recommended_feature,
    r.score,
    r.position,
    r.placement,
    r.strategy,
    r.experiment,
    r.variant,
    r.propensity,
    r.generated_at,
    CASE WHEN c.click_timestamp IS NOT NULL THEN 1 ELSE 0 END AS clicked,
    c.click_timestamp,
    CASE WHEN d.dismiss_timestamp IS NOT NULL THEN 1 ELSE 0 END AS dismissed,
    CASE WHEN u.first_use_timestamp <= r.generated_at + INTERVAL 7 DAY
         THEN 1 ELSE 0 END AS adopted_7d,
    CASE WHEN u.first_use_timestamp <= r.generated_at + INTERVAL 30 DAY
         THEN 1 ELSE 0 END AS adopted_30d,
    u.first_use_timestamp
FROM recs r
LEFT JOIN clicks c ON c.recommendation_id = r.recommendation_id
LEFT JOIN dismissals d ON d.recommendation_id = r.recommendation_id
LEFT JOIN first_use_after_rec u ON u.recommendation_id = r.recommendation_id;
