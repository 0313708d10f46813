"""DDL of every warehouse table, in one place.

Raw tables (``main`` schema) are written only by ingestion; ``ml.*`` tables are written by
the SQL transforms, the recommendation-log loader and attribution. Timestamps are UTC,
timezone-naive ``TIMESTAMP``.
"""

from __future__ import annotations

RAW_TABLES: dict[str, str] = {
    "events": """
        CREATE TABLE IF NOT EXISTS events (
            event_id VARCHAR NOT NULL,
            user_id VARCHAR NOT NULL,
            workspace_id VARCHAR,
            event_type VARCHAR NOT NULL,
            timestamp TIMESTAMP NOT NULL,
            feature_category VARCHAR,
            feature_name VARCHAR,
            context VARCHAR,
            session_id VARCHAR,
            session_sequence INTEGER,
            time_on_page_seconds DOUBLE,
            is_first_use BOOLEAN,
            properties VARCHAR,
            user_traits VARCHAR,
            source VARCHAR,
            received_at TIMESTAMP
        )""",
    "users": """
        CREATE TABLE IF NOT EXISTS users (
            user_id VARCHAR PRIMARY KEY,
            workspace_id VARCHAR,
            role VARCHAR,
            signup_date DATE,
            signup_cohort VARCHAR,
            traits VARCHAR,
            updated_at TIMESTAMP
        )""",
    "workspaces": """
        CREATE TABLE IF NOT EXISTS workspaces (
            workspace_id VARCHAR PRIMARY KEY,
            name VARCHAR,
            plan VARCHAR,
            industry VARCHAR,
            seat_count INTEGER,
            created_at TIMESTAMP,
            churned_at TIMESTAMP,
            updated_at TIMESTAMP
        )""",
    "feature_flags": """
        CREATE TABLE IF NOT EXISTS feature_flags (
            flag_id VARCHAR PRIMARY KEY,
            name VARCHAR NOT NULL,
            enabled BOOLEAN NOT NULL,
            rollout_percentage DOUBLE,
            target_segments VARCHAR,
            plans VARCHAR,
            updated_at TIMESTAMP
        )""",
    "ab_assignments": """
        CREATE TABLE IF NOT EXISTS ab_assignments (
            experiment VARCHAR NOT NULL,
            user_id VARCHAR NOT NULL,
            variant VARCHAR NOT NULL,
            assigned_at TIMESTAMP,
            PRIMARY KEY (experiment, user_id)
        )""",
    "support_tickets": """
        CREATE TABLE IF NOT EXISTS support_tickets (
            ticket_id VARCHAR PRIMARY KEY,
            user_id VARCHAR,
            workspace_id VARCHAR,
            created_at TIMESTAMP,
            updated_at TIMESTAMP,
            subject VARCHAR,
            tags VARCHAR,
            status VARCHAR,
            feature VARCHAR
        )""",
    "ingest_quarantine": """
        CREATE TABLE IF NOT EXISTS ingest_quarantine (
            source VARCHAR,
            location VARCHAR,
            reason VARCHAR,
            raw VARCHAR,
            quarantined_at TIMESTAMP
        )""",
    "ingest_batches": """
        CREATE TABLE IF NOT EXISTS ingest_batches (
            batch_id VARCHAR PRIMARY KEY,
            source VARCHAR,
            accepted BIGINT,
            duplicate BIGINT,
            filtered BIGINT,
            quarantined BIGINT,
            committed_at TIMESTAMP
        )""",
}

ML_TABLES: dict[str, str] = {
    # Spec Stage 6/7: every served recommendation, with the logging policy's propensity.
    "recommendation_log": """
        CREATE TABLE IF NOT EXISTS ml.recommendation_log (
            recommendation_id VARCHAR PRIMARY KEY,
            request_id VARCHAR,
            user_id VARCHAR NOT NULL,
            recommended_feature VARCHAR NOT NULL,
            score DOUBLE,
            position INTEGER,
            placement VARCHAR,
            strategy VARCHAR,
            experiment VARCHAR,
            variant VARCHAR,
            model_version VARCHAR,
            propensity DOUBLE,
            fallback BOOLEAN,
            generated_at TIMESTAMP NOT NULL
        )""",
    # Spec Stage 8 (OPE): what the policy saw for each served request -- the user state the
    # model scored and the features the eligibility rules left -- so a candidate can be
    # replayed on the same decision (serving/reclog.py CONTEXT_COLUMNS; JSON in VARCHARs).
    "recommendation_context": """
        CREATE TABLE IF NOT EXISTS ml.recommendation_context (
            request_id VARCHAR PRIMARY KEY,
            user_id VARCHAR NOT NULL,
            generated_at TIMESTAMP NOT NULL,
            placement VARCHAR,
            slate_size INTEGER,
            candidate_top_k INTEGER,
            exploration_rate DOUBLE,
            user_context VARCHAR,
            interactions VARCHAR,
            recent_features VARCHAR,
            event_count INTEGER,
            eligible VARCHAR,
            excluded VARCHAR,
            exposure_excluded VARCHAR
        )""",
    # impression / click / dismiss, idempotent by feedback_id.
    "recommendation_events": """
        CREATE TABLE IF NOT EXISTS ml.recommendation_events (
            feedback_id VARCHAR PRIMARY KEY,
            recommendation_id VARCHAR NOT NULL,
            user_id VARCHAR,
            kind VARCHAR NOT NULL,
            timestamp TIMESTAMP NOT NULL
        )""",
    # Spec Stage 7 attribution output.
    "recommendation_feedback": """
        CREATE TABLE IF NOT EXISTS ml.recommendation_feedback (
            recommendation_id VARCHAR PRIMARY KEY,
            user_id VARCHAR,
            recommended_feature VARCHAR,
            score DOUBLE,
            position INTEGER,
            placement VARCHAR,
            strategy VARCHAR,
            experiment VARCHAR,
            variant VARCHAR,
            propensity DOUBLE,
            generated_at TIMESTAMP,
            clicked INTEGER,
            click_timestamp TIMESTAMP,
            dismissed INTEGER,
            adopted_7d INTEGER,
            adopted_30d INTEGER,
            first_use_timestamp TIMESTAMP
        )""",
}

#: The spec's ml.recommendation_clicks, derived from the feedback events.
VIEWS: dict[str, str] = {
    "recommendation_clicks": """
        CREATE OR REPLACE VIEW ml.recommendation_clicks AS
        SELECT recommendation_id, MIN(timestamp) AS click_timestamp
        FROM ml.recommendation_events WHERE kind = 'click'
        GROUP BY recommendation_id""",
}


#: Columns added to a table after its first release: a warehouse created before gets them
#: (the CREATE TABLE above has them already, so on a new warehouse these do nothing).
ADDED_COLUMNS: list[str] = [
    "ALTER TABLE ml.recommendation_context ADD COLUMN IF NOT EXISTS exposure_excluded VARCHAR",
]


def all_ddl() -> list[str]:
    return [
        "CREATE SCHEMA IF NOT EXISTS ml",
        *RAW_TABLES.values(),
        *ML_TABLES.values(),
        *ADDED_COLUMNS,
        *VIEWS.values(),
    ]
