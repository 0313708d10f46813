-- Discovery (spec Stage 2), "Cold-Start User Profiling": users who signed up in the last
-- $days days, by role, plan and team size bucket, with their activity in the same window.
--
-- Differences from the spec's text, on purpose:
--   * team_size_bucket is the bucket of the spec's context features (small <= 5,
--     medium <= 20, large <= 100, else enterprise; a NULL seat_count is 'small', as
--     models/base.py team_size_bucket does), not the raw seat_count the spec aliases;
--   * LEFT JOIN workspaces, so a user whose workspace row is missing still counts;
--   * users who signed up after $as_of do not exist yet and are left out (backfills);
--   * the windows are relative to $as_of, from midnight of ($as_of's date - $days days).
--
-- Params: $as_of TIMESTAMP, $days INTEGER (settings.windows.cold_start_signup_days, spec: 14).
WITH activity AS (
    SELECT
        user_id,
        COUNT(*)                                     AS event_count,
        COUNT(DISTINCT feature_category)             AS features_used
    FROM events
    WHERE timestamp >= CAST($as_of AS DATE) - $days * INTERVAL '1' DAY
      AND timestamp <= $as_of
    GROUP BY user_id
)
SELECT
    u.role,
    w.plan,
    CASE
        WHEN w.seat_count IS NULL OR w.seat_count <= 5 THEN 'small'
        WHEN w.seat_count <= 20  THEN 'medium'
        WHEN w.seat_count <= 100 THEN 'large'
        ELSE 'enterprise'
    END                                              AS team_size_bucket,
    COUNT(DISTINCT u.user_id)                        AS new_users,
    AVG(COALESCE(a.event_count, 0))                  AS avg_events,
    AVG(COALESCE(a.features_used, 0))                AS avg_features_used
FROM users u
LEFT JOIN workspaces w ON u.workspace_id = w.workspace_id
LEFT JOIN activity a ON u.user_id = a.user_id
WHERE u.signup_date >= CAST($as_of AS DATE) - $days * INTERVAL '1' DAY
  AND u.signup_date <= CAST($as_of AS DATE)
GROUP BY 1, 2, 3
ORDER BY new_users DESC, role, plan, team_size_bucket
