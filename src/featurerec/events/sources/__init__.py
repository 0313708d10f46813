"""External sources. Every one ends in the one append path of :mod:`featurerec.events`
(``normalize_records`` → ``Ingestor.append`` / ``Landing.write`` for events,
``Ingestor.upsert_rows`` / ``delete_rows`` for product rows).

==================  ===========================================================  ==============
module              what                                                         command
==================  ===========================================================  ==============
segment_http        Segment-compatible ``/v1/batch|track|identify|page``         (server)
                    (``build_router(settings, on_batch)``, mounted by serving)
kafka               consumer group, regex topics, commit after durable write      sources kafka
postgres_cdc        logical replication (pgoutput, slot, exported snapshot, LSN)  sources sync
postgres_cursor     ``updated_at`` cursor (no deletes) where CDC is not allowed   sources sync
zendesk             incremental cursor export API + export files; feature topics  sources sync,
                                                                                 zendesk-import
scheduler           every source at its frequency, state, backoff, status        sources sync,
                                                                                 sources status
==================  ===========================================================  ==============

Configuration: ``[sources.NAME]`` in ``featurerec.toml`` with ``kind``, ``every_seconds``
(default 900 = the spec's 15 minutes; 0 = real time) and ``options`` (typed per kind:
:class:`~featurerec.events.sources.segment_http.SegmentOptions`,
:class:`~featurerec.events.sources.kafka.KafkaOptions`,
:class:`~featurerec.events.sources.postgres_common.PostgresOptions`,
:class:`~featurerec.events.sources.zendesk.ZendeskOptions`). Example::

    [sources.web]
    kind = "segment_http"
    options = { write_keys = ["wk_live_..."] }

    [sources.events]
    kind = "kafka"
    every_seconds = 0
    options = { bootstrap_servers = "kafka:9092", topic_pattern = "segment.cloudflow.events.*",
                group_id = "matih-recommender-ingestion" }

    [sources.product]
    kind = "postgres_cdc"
    options = { dsn = "host=db dbname=product user=featurerec" }

    [sources.assignments]
    kind = "postgres_cdc"
    every_seconds = 0
    options = { dsn = "host=db dbname=product user=featurerec", slot = "featurerec_ab",
                publication = "featurerec_ab",
                tables = { "public.ab_assignments" = { target = "ab_assignments" } } }

    [sources.support]
    kind = "zendesk"
    options = { subdomain = "cloudflow", email = "ops@cloudflow.io", api_token = "...",
                features = { automations = { tags = ["automation_rules"],
                                             keywords = ["automation", "trigger"] } } }

State lives under ``<data_dir>/sources/<name>/state.json``; trait updates from ``identify``
calls wait in ``<data_dir>/sources/traits-landing/`` until ``sources sync`` applies them.
"""
