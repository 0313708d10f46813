-- Discovery (spec Stage 2), "Event Volume Analysis": weekly feature_used volume.
--
-- Weeks start on Monday (DATE_TRUNC('week')). Window: from midnight of ($as_of's date -
-- $weeks weeks) up to and including $as_of, the spec's CURRENT_DATE - INTERVAL '12' WEEK
-- relative to the as-of time instead of the wall clock. The spec's
-- JSON_EXTRACT_SCALAR(properties, '$.feature_category') / '$.is_first_use' are the promoted
-- columns feature_category / is_first_use (events/schema.py). The first and last weeks can
-- be partial.
--
-- Params: $as_of TIMESTAMP, $weeks INTEGER (settings.windows.discovery_weeks, spec: 12).
SELECT
    CAST(DATE_TRUNC('week', timestamp) AS DATE)      AS week,
    COUNT(*)                                         AS total_events,
    COUNT(DISTINCT user_id)                          AS unique_users,
    COUNT(DISTINCT feature_category)                 AS distinct_features,
    COUNT(*) FILTER (WHERE is_first_use)             AS first_use_events
FROM events
WHERE event_type = 'feature_used'
  AND timestamp >= CAST($as_of AS DATE) - $weeks * INTERVAL '7' DAY
  AND timestamp <= $as_of
GROUP BY 1
ORDER BY 1
