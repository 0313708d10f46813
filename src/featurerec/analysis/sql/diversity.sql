-- Spec Stage 5 "Recommendation Diversity Analysis": per user over the last $days days,
-- unique features recommended / recommendations; the distribution over users.
SELECT ROUND(unique_recs * 1.0 / total_recs, 2) AS diversity_score,
       COUNT(*) AS user_count
FROM (
    SELECT user_id,
           COUNT(DISTINCT recommended_feature) AS unique_recs,
           COUNT(*) AS total_recs
    FROM ml.recommendation_log
    WHERE generated_at > $as_of - to_days($days) AND generated_at <= $as_of
    GROUP BY user_id
) per_user
GROUP BY 1
ORDER BY 1;
