-- ml.user_context_vectors: context for cold start and the contextual bandit (spec Stage 3).
--
-- The spec's columns (role, plan, seat_count, team_size_bucket, account_age_days,
-- features_used_count, total_events_7d) plus two extras the context model uses: industry
-- and open_feature_tickets (support tickets about a feature still open at $as_of).
-- Differences from the spec's text, on purpose:
--   * LEFT JOIN workspaces, so a user whose workspace row is missing still gets a vector;
--   * a NULL seat_count is 'small' (as models/base.py team_size_bucket does), not 'enterprise';
--   * users who signed up after $as_of do not exist yet and are left out (backfills);
--   * activity counts every event type in the window, as the spec's subquery does.
-- Users with no events get zeros (the cold-start population).
--
-- Params: $as_of TIMESTAMP, $days INTEGER (settings.windows.context_activity_days, spec: 7).
WITH activity AS (
    SELECT
        user_id,
        COUNT(DISTINCT feature_category) AS features_used,
        COUNT(*)                         AS total_events
    FROM events
    WHERE timestamp >= CAST($as_of AS DATE) - $days * INTERVAL '1' DAY
      AND timestamp <= $as_of
    GROUP BY user_id
),
open_tickets AS (
    SELECT
        user_id,
        COUNT(*) AS open_feature_tickets
    FROM support_tickets
    WHERE feature IS NOT NULL
      AND user_id IS NOT NULL
      AND (created_at IS NULL OR created_at <= $as_of)
      -- closed at as-of: solved/closed and last touched no later than as-of
      AND NOT (
          COALESCE(LOWER(status), 'open') IN ('solved', 'closed')
          AND COALESCE(updated_at, created_at) <= $as_of
      )
    GROUP BY user_id
)
SELECT
    u.user_id,
    u.role,
    w.plan,
    w.seat_count,
    CASE
        WHEN w.seat_count IS NULL THEN 'small'
        WHEN w.seat_count <= 5    THEN 'small'
        WHEN w.seat_count <= 20   THEN 'medium'
        WHEN w.seat_count <= 100  THEN 'large'
        ELSE 'enterprise'
    END                                              AS team_size_bucket,
    w.industry,
    DATE_DIFF('day', u.signup_date, CAST($as_of AS DATE)) AS account_age_days,
    COALESCE(a.features_used, 0)                     AS features_used_count,
    COALESCE(a.total_events, 0)                      AS total_events_7d,
    COALESCE(t.open_feature_tickets, 0)              AS open_feature_tickets
FROM users u
LEFT JOIN workspaces w ON u.workspace_id = w.workspace_id
LEFT JOIN activity a ON u.user_id = a.user_id
LEFT JOIN open_tickets t ON u.user_id = t.user_id
WHERE u.signup_date IS NULL OR u.signup_date <= CAST($as_of AS DATE)
ORDER BY u.user_id
