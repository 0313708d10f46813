-- Discovery (spec Stage 2), "Feature-to-Capability Ontology": enabled feature flags joined
-- to their usage in the last $days days, with the adoption rate of the spec's table.
--
-- Differences from the spec's text, on purpose:
--   * events_30d counts the joined events (COUNT(e.event_id)), so a flag nobody used shows
--     0 events, not the 1 that COUNT(*) gives for the LEFT JOIN's null row;
--   * adoption_rate = users_30d / active users, where active users are the distinct users
--     with any event in the same window (the spec's table: kanban_boards 52,000 users ->
--     52% of 100k active users); NULL when nobody was active;
--   * the window is relative to $as_of, from midnight of ($as_of's date - $days days) up to
--     and including $as_of.
--
-- Params: $as_of TIMESTAMP, $days INTEGER (settings.windows.ontology_days, spec: 30).
WITH window_events AS (
    SELECT event_id, user_id, workspace_id, feature_category, timestamp
    FROM events
    WHERE timestamp >= CAST($as_of AS DATE) - $days * INTERVAL '1' DAY
      AND timestamp <= $as_of
),
active AS (
    SELECT COUNT(DISTINCT user_id) AS active_users FROM window_events
)
SELECT
    ff.flag_id,
    ff.name                                          AS feature_name,
    ff.rollout_percentage,
    ff.target_segments,
    COUNT(DISTINCT e.user_id)                        AS users_30d,
    COUNT(DISTINCT e.workspace_id)                   AS workspaces_30d,
    COUNT(e.event_id)                                AS events_30d,
    MIN(e.timestamp)                                 AS first_event,
    MAX(e.timestamp)                                 AS last_event,
    COUNT(DISTINCT e.user_id) * 1.0 / NULLIF(ANY_VALUE(a.active_users), 0)
                                                     AS adoption_rate
FROM feature_flags ff
CROSS JOIN active a
LEFT JOIN window_events e ON e.feature_category = ff.name
WHERE ff.enabled = true
GROUP BY ff.flag_id, ff.name, ff.rollout_percentage, ff.target_segments
ORDER BY users_30d DESC, feature_name
