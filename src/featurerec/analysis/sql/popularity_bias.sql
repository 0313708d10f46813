-- Spec Stage 5 "Popularity Bias Check": recommendation share vs usage share per feature.
-- Usage = distinct users with a feature_used event for the feature in the $usage_days before
-- $as_of (the population of ml.user_feature_interactions, read straight from events so the
-- report does not depend on the transform having run). FULL OUTER JOIN, so features that are
-- never recommended (or recommended but unused) show up too, with a share of 0.
-- Positive bias = recommended more than it is used (promoting discovery); negative = less.
WITH recommendation_distribution AS (
    SELECT recommended_feature AS feature,
           COUNT(*) AS times_recommended,
           COUNT(DISTINCT user_id) AS unique_users_shown
    FROM ml.recommendation_log
    WHERE generated_at > $as_of - to_days($rec_days) AND generated_at <= $as_of
    GROUP BY recommended_feature
),
usage_distribution AS (
    SELECT feature_category AS feature, COUNT(DISTINCT user_id) AS current_users
    FROM events
    WHERE event_type = 'feature_used' AND feature_category IS NOT NULL
      AND timestamp > $as_of - to_days($usage_days) AND timestamp <= $as_of
    GROUP BY feature_category
),
joined AS (
    SELECT COALESCE(r.feature, u.feature) AS feature,
           COALESCE(r.times_recommended, 0) AS times_recommended,
           COALESCE(r.unique_users_shown, 0) AS unique_users_shown,
           COALESCE(u.current_users, 0) AS current_users
    FROM recommendation_distribution r
    FULL OUTER JOIN usage_distribution u ON r.feature = u.feature
)
SELECT feature,
       times_recommended,
       unique_users_shown,
       current_users,
       times_recommended * 1.0 / NULLIF(SUM(times_recommended) OVER (), 0) AS rec_share,
       current_users * 1.0 / NULLIF(SUM(current_users) OVER (), 0) AS usage_share,
       COALESCE(times_recommended * 1.0 / NULLIF(SUM(times_recommended) OVER (), 0), 0)
         - COALESCE(current_users * 1.0 / NULLIF(SUM(current_users) OVER (), 0), 0)
           AS popularity_bias
FROM joined
ORDER BY popularity_bias DESC, feature;
