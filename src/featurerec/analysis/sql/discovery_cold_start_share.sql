-- Discovery (spec Stage 2): "Cold-start users (< 5 interactions) represent 35% of the active
-- user base". Active users: distinct users with any event in the last $days days up to
-- $as_of; cold-start: fewer than $max_events feature_used events in all history up to
-- $as_of (the same definition as the simulator's calibration report).
--
-- Params: $as_of TIMESTAMP, $days INTEGER (settings.windows.ontology_days, spec: 30),
--         $max_events INTEGER (settings.windows.cold_start_max_events, spec: 5).
WITH active AS (
    SELECT DISTINCT user_id
    FROM events
    WHERE timestamp >= CAST($as_of AS DATE) - $days * INTERVAL '1' DAY
      AND timestamp <= $as_of
),
interactions AS (
    SELECT user_id, COUNT(*) AS n
    FROM events
    WHERE event_type = 'feature_used' AND timestamp <= $as_of
    GROUP BY user_id
)
SELECT
    COUNT(*)                                                        AS active_users,
    COUNT(*) FILTER (WHERE COALESCE(i.n, 0) < $max_events)          AS cold_start_users,
    COUNT(*) FILTER (WHERE COALESCE(i.n, 0) < $max_events) * 1.0 / NULLIF(COUNT(*), 0)
                                                                    AS cold_start_share
FROM active a
LEFT JOIN interactions i USING (user_id)
