-- Spec Stage 5 "Cold-Start User Performance": CTR and 7-day adoption by user segment, for
-- the model's recommendations and for the random baseline (log rows with strategy='random').
-- user_event_count = the user's feature_used events BEFORE the recommendation was generated
-- (an ASOF join on a running count), so a user is cold when the recommendation was made,
-- not at report time. Segments: cold < $cold_max, warm < $active_min, active otherwise.
WITH ev AS (
    SELECT user_id, timestamp,
           ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY timestamp, event_id) AS n_events
    FROM events
    WHERE event_type = 'feature_used'
),
recs AS (
    SELECT *
    FROM ml.recommendation_feedback
    WHERE generated_at > $as_of - to_days($days) AND generated_at <= $as_of
),
counted AS (
    SELECT r.*, COALESCE(e.n_events, 0) AS user_event_count
    FROM recs r
    ASOF LEFT JOIN ev e ON r.user_id = e.user_id AND r.generated_at > e.timestamp
)
SELECT
    CASE WHEN user_event_count < $cold_max THEN 'cold'
         WHEN user_event_count < $active_min THEN 'warm'
         ELSE 'active' END AS segment,
    CASE WHEN strategy = 'random' THEN 'random' ELSE 'model' END AS arm,
    COUNT(*) AS recommendations,
    COUNT(DISTINCT user_id) AS users,
    SUM(clicked) AS clicks,
    AVG(clicked) AS click_through_rate,
    AVG(adopted_7d) AS adoption_rate_7d
FROM counted
GROUP BY 1, 2
ORDER BY 1, 2;
