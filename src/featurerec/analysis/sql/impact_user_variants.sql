-- Each user's variant in experiment $experiment: ab_assignments first, else the variant the
-- recommendation log recorded (the exposure).
SELECT user_id, variant FROM ab_assignments WHERE experiment = $experiment
UNION ALL
SELECT user_id, ANY_VALUE(variant) AS variant
FROM ml.recommendation_log
WHERE experiment = $experiment AND variant IS NOT NULL
  AND user_id NOT IN (SELECT user_id FROM ab_assignments WHERE experiment = $experiment)
GROUP BY user_id;
