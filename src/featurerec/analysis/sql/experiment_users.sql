-- One row per (variant, user) of an experiment: the user is the randomisation unit.
-- From ml.recommendation_feedback (run `featurerec feedback attribute` first). Diversity is
-- the spec's per user per week ratio (unique features / recommendations), averaged over the
-- user's weeks. Adoption = the user adopted some recommended feature within 7 / 30 days of
-- its recommendation, as observed by $as_of.
WITH recs AS (
    SELECT *
    FROM ml.recommendation_feedback
    WHERE experiment = $experiment AND generated_at <= $as_of AND variant IS NOT NULL
),
weekly AS (
    SELECT variant, user_id, DATE_TRUNC('week', generated_at) AS week,
           COUNT(DISTINCT recommended_feature) * 1.0 / COUNT(*) AS diversity
    FROM recs
    GROUP BY variant, user_id, week
),
per_user AS (
    SELECT variant, user_id,
           COUNT(*) AS recs,
           SUM(clicked) AS clicks,
           SUM(dismissed) AS dismissals,
           SUM(adopted_7d) AS adopted_recs_7d,
           MAX(adopted_7d) AS adopted_7d,
           MAX(adopted_30d) AS adopted_30d
    FROM recs
    GROUP BY variant, user_id
)
SELECT p.variant, p.user_id, p.recs, p.clicks, p.dismissals, p.adopted_recs_7d,
       p.adopted_7d, p.adopted_30d, AVG(w.diversity) AS diversity
FROM per_user p
JOIN weekly w ON w.variant = p.variant AND w.user_id = p.user_id
GROUP BY p.variant, p.user_id, p.recs, p.clicks, p.dismissals, p.adopted_recs_7d,
         p.adopted_7d, p.adopted_30d
ORDER BY p.variant, p.user_id;
