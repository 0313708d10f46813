-- Input of the collaborative signal (spec Stage 3, "user_features"): the features each user
-- uses with interaction_strength >= $min_strength (spec: 0.2). The Jaccard neighbours are
-- computed from this in Python with sparse products (transforms.compute_user_neighbors),
-- never by materialising all user pairs in SQL.
--
-- Params: $min_strength DOUBLE (settings.windows.jaccard_min_strength).
SELECT DISTINCT user_id, feature
FROM ml.user_feature_interactions
WHERE interaction_strength >= $min_strength
