-- Spec "Combined Impact", per workspace active in [$start, $end):
--  features_adopted: distinct features its users used by $end;
--  churned:          workspaces.churned_at falls in [$start, $end).
WITH active AS (
    SELECT DISTINCT workspace_id FROM events
    WHERE workspace_id IS NOT NULL AND timestamp >= $start AND timestamp < $end
),
feats AS (
    SELECT workspace_id, COUNT(DISTINCT feature_category) AS features_adopted
    FROM events
    WHERE workspace_id IS NOT NULL AND feature_category IS NOT NULL AND timestamp < $end
    GROUP BY workspace_id
)
SELECT a.workspace_id,
       COALESCE(f.features_adopted, 0) AS features_adopted,
       CASE WHEN w.churned_at >= $start AND w.churned_at < $end THEN 1 ELSE 0 END AS churned
FROM active a
LEFT JOIN feats f ON f.workspace_id = a.workspace_id
LEFT JOIN workspaces w ON w.workspace_id = a.workspace_id;
