-- Spec "Combined Impact", per user, for users active in [$start, $end):
--  adopted_30d: the user first used some feature (is_first_use) within 30 days of $start
--               (or of their first event in the window, for users who arrive later); the
--               feature a user arrived with (their first feature ever) is not an adoption;
--  is_new:      the user's first event ever falls in the window;
--  ttv_days:    new users only: days from their first event to the first use of their
--               SECOND distinct feature (the first one is how they arrived; the second is the
--               first value found beyond it), NULL when not reached within 30 days.
WITH firsts AS (
    SELECT user_id, feature_category AS feature, MIN(timestamp) AS first_use
    FROM events
    WHERE feature_category IS NOT NULL AND timestamp < $end
    GROUP BY user_id, feature_category
),
ranked AS (
    SELECT user_id, feature, first_use,
           ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY first_use, feature) AS k
    FROM firsts
),
active AS (
    SELECT user_id, ANY_VALUE(workspace_id) AS workspace_id, MIN(timestamp) AS first_in_window
    FROM events
    WHERE timestamp >= $start AND timestamp < $end
    GROUP BY user_id
),
first_ever AS (
    SELECT user_id, MIN(timestamp) AS first_event FROM events WHERE timestamp < $end GROUP BY user_id
),
adoptions AS (
    SELECT a.user_id, MAX(CASE WHEN e.timestamp < GREATEST(a.first_in_window, $start) + INTERVAL 30 DAY
                               THEN 1 ELSE 0 END) AS adopted_30d
    FROM active a
    JOIN events e ON e.user_id = a.user_id
    LEFT JOIN ranked r1 ON r1.user_id = a.user_id AND r1.k = 1
    WHERE e.is_first_use AND e.timestamp >= $start AND e.timestamp < $end
      AND e.feature_category IS DISTINCT FROM r1.feature
    GROUP BY a.user_id
)
SELECT a.user_id,
       a.workspace_id,
       COALESCE(ad.adopted_30d, 0) AS adopted_30d,
       (f.first_event >= $start) AS is_new,
       CASE WHEN f.first_event >= $start AND r2.first_use <= f.first_event + INTERVAL 30 DAY
            THEN EXTRACT(EPOCH FROM (r2.first_use - f.first_event)) / 86400.0 END AS ttv_days
FROM active a
JOIN first_ever f ON f.user_id = a.user_id
LEFT JOIN adoptions ad ON ad.user_id = a.user_id
LEFT JOIN ranked r2 ON r2.user_id = a.user_id AND r2.k = 2;
