-- ml.feature_transition_probs: which feature users move to next within a session (spec Stage 3).
--
-- A transition is a pair of consecutive feature_used events in one session whose features
-- differ (the spec's self-join on seq_num + 1 with a.feature != b.feature, written with LEAD).
-- Sessions are keyed by (user_id, session_id) so that ids reused across users never mix.
--
-- transition_prob is P(to | from) over ALL transitions leaving from_feature in the window
-- (from_total), computed BEFORE the minimum-count filter. The spec's SQL puts the window
-- SUM in the same SELECT as HAVING, which renormalises over the kept pairs only and so
-- inflates the probabilities of the survivors when rare pairs are dropped; we keep the true
-- conditional probability (kept rows of one from_feature sum to <= 1) and expose from_total
-- so a consumer can renormalise if it wants to.
--
-- Params: $as_of TIMESTAMP, $days INTEGER (settings.windows.transition_days, spec: 30),
--         $min_count INTEGER (settings.windows.min_transition_count, spec: 50).
WITH feature_sequences AS (
    SELECT
        e.user_id,
        e.feature_category AS feature,
        LEAD(e.feature_category) OVER (
            PARTITION BY e.user_id, e.session_id
            ORDER BY e.timestamp, e.session_sequence, e.event_id
        ) AS next_feature
    FROM events e
    WHERE e.event_type = 'feature_used'
      AND e.feature_category IS NOT NULL
      AND e.session_id IS NOT NULL
      AND e.timestamp >= CAST($as_of AS DATE) - $days * INTERVAL '1' DAY
      AND e.timestamp <= $as_of
),
pairs AS (
    SELECT
        feature                   AS from_feature,
        next_feature              AS to_feature,
        COUNT(*)                  AS transition_count,
        COUNT(DISTINCT user_id)   AS unique_users
    FROM feature_sequences
    WHERE next_feature IS NOT NULL
      AND next_feature <> feature
    GROUP BY feature, next_feature
),
with_totals AS (
    SELECT
        from_feature,
        to_feature,
        transition_count,
        unique_users,
        SUM(transition_count) OVER (PARTITION BY from_feature) AS from_total
    FROM pairs
)
SELECT
    from_feature,
    to_feature,
    transition_count,
    unique_users,
    from_total,
    ROUND(transition_count * 1.0 / from_total, 3) AS transition_prob
FROM with_totals
WHERE transition_count >= $min_count
ORDER BY transition_count DESC, from_feature, to_feature
