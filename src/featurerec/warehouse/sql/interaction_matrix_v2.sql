-- ml.user_feature_interactions: the spec's (Stage 3) user x feature interaction matrix.
--
-- Window: feature_used events from midnight of ($as_of's date - $days days) up to and
-- including $as_of. The spec's CURRENT_DATE is the as-of date, so backfills and evaluation
-- never see events after the as-of time. The spec's
-- JSON_EXTRACT_SCALAR(properties, '$.feature_category') is the promoted column
-- feature_category (events/schema.py).
--
-- Params: $as_of TIMESTAMP, $days INTEGER (settings.windows.interaction_days, spec: 90).
WITH interactions AS (
    SELECT
        e.user_id,
        e.feature_category                          AS feature,
        COUNT(*)                                    AS use_count,
        COUNT(DISTINCT CAST(e.timestamp AS DATE))   AS active_days,
        MAX(e.timestamp)                            AS last_used,
        MIN(e.timestamp)                            AS first_used,
        -- Recency-weighted interaction score: 1 / (1 + days between event date and as-of date),
        -- each term fixed to 12 decimals and summed exactly: a parallel sum of doubles
        -- depends on thread timing in its last bits, which ROUND(.., 3) below can flip, and
        -- every seeded model downstream would then differ from run to run
        CAST(SUM(CAST(1.0 / (1 + DATE_DIFF('day', CAST(e.timestamp AS DATE),
                                           CAST($as_of AS DATE))) AS DECIMAL(18, 12)))
             AS DOUBLE)                             AS recency_weighted_score
    FROM events e
    WHERE e.event_type = 'feature_used'
      AND e.feature_category IS NOT NULL
      AND e.timestamp >= CAST($as_of AS DATE) - $days * INTERVAL '1' DAY
      AND e.timestamp <= $as_of
    GROUP BY e.user_id, e.feature_category
)
SELECT
    user_id,
    feature,
    use_count,
    active_days,
    last_used,
    first_used,
    recency_weighted_score,
    -- Normalise to a 0-1 interaction strength (spec formula, unchanged)
    ROUND(
        (0.4 * LEAST(use_count / 100.0, 1.0)) +
        (0.3 * LEAST(active_days / 30.0, 1.0)) +
        (0.3 * recency_weighted_score / 10.0),
    3) AS interaction_strength
FROM interactions
ORDER BY user_id, feature
