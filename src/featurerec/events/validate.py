"""Validation of incoming events: one set of rules for every way events come in.

Every source (files, the Segment HTTP intake, Kafka, simulated worlds) turns what it received
into a :class:`ValidatedBatch` here, and :class:`featurerec.events.ingest.Ingestor` or
:class:`featurerec.events.landing.Landing` stores it. The functions are pure: they never touch
the warehouse.

Three entry points, one rule set:

* :func:`normalize_records` — Python objects (dicts in the spec's nested shape or the flat
  :data:`~featurerec.events.schema.EVENT_ARROW_SCHEMA` shape) or raw JSON text/bytes, e.g.
  one HTTP batch or a poll of Kafka messages;
* :func:`normalize_lines` — an Arrow array of JSON lines (the NDJSON fast path);
* :func:`normalize_table` — an Arrow table read from Parquet or CSV, nested or flat, with an
  optional column mapping for other shapes.

The rules are evaluated as vectorised SQL in a private in-memory DuckDB (yyjson parsing, no
per-record Python), in this order, the first failing rule giving the quarantine reason:

1. the record is a JSON object (NDJSON / raw text);
2. required fields present: ``event_id``, ``user_id``, ``event_type``, ``timestamp``;
3. types: ids, ``event_type`` and the text properties take any JSON scalar as text (so
   ``"user_id": 42`` is stored as ``"42"``) but not an object or array;
   ``session_sequence`` is a JSON integer within 32 bits, ``time_on_page_seconds`` a JSON
   number, ``is_first_use`` ``true``/``false`` (strings such as ``"14"`` are refused);
   ``properties`` and ``user_traits`` are objects (or JSON text of an object, the flat
   shape);
4. ``event_id``, ``user_id`` and ``event_type`` are not empty;
5. ``timestamp`` is an ISO-8601 timestamp (an offset or ``Z`` is converted to UTC; without
   one it is taken as UTC), stored UTC timezone-naive;
6. ``timestamp`` is not more than ``settings.ingest.max_future_skew_seconds`` after the
   ingestion time.

The include/exclude filter of ``settings.ingest`` (spec Stage 1; an empty include list
means every type not excluded) is applied first: records whose ``event_type`` it drops are
counted as *filtered* without further checks, as a source-side filter would. Of several
valid events with the same ``event_id`` the first one is kept and the others are counted as
*duplicates*. Property keys other than the promoted ones are kept as JSON text; a promoted
property whose value is ``null`` is treated as absent.

Example::

    >>> from featurerec.config import Settings
    >>> batch = normalize_records(
    ...     [{"event_id": "e1", "user_id": "u1", "event_type": "feature_used",
    ...       "timestamp": "2026-02-28T14:23:17Z",
    ...       "properties": {"feature_category": "automations", "plan_hint": "x"}},
    ...      {"event_id": "e2", "user_id": "u1", "event_type": "heartbeat",
    ...       "timestamp": "2026-02-28T14:23:18Z"},
    ...      {"event_id": "e3", "user_id": "u1", "event_type": "feature_used",
    ...       "timestamp": "yesterday"}],
    ...     settings=Settings(), source="doc")
    >>> batch.accepted, batch.filtered, batch.quarantined
    (1, 1, 1)
    >>> batch.events.column("properties").to_pylist()
    ['{"plan_hint":"x"}']
    >>> batch.quarantine.column("reason").to_pylist()
    ["timestamp: not an ISO-8601 timestamp (got 'yesterday')"]
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.events.schema import EVENT_ARROW_SCHEMA, PROMOTED_PROPERTIES, REQUIRED_FIELDS

#: Arrow schema of quarantined records (the ``ingest_quarantine`` columns but the time).
QUARANTINE_ARROW_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("location", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("raw", pa.string()),
    ]
)

#: Raw text kept for a quarantined record is cut at this many characters.
MAX_RAW_CHARS = 16_384

FieldKind = Literal["id", "text", "int", "number", "bool", "timestamp"]

#: Scalar event fields and how they are typed; ``properties``/``user_traits`` are objects.
TOP_FIELDS: dict[str, FieldKind] = {
    "event_id": "id",
    "user_id": "id",
    "workspace_id": "id",
    "event_type": "text",
    "timestamp": "timestamp",
}
PROPERTY_FIELDS: dict[str, FieldKind] = {
    "feature_category": "text",
    "feature_name": "text",
    "context": "text",
    "session_id": "id",
    "session_sequence": "int",
    "time_on_page_seconds": "number",
    "is_first_use": "bool",
}
assert set(PROPERTY_FIELDS) == set(PROMOTED_PROPERTIES)
OBJECT_FIELDS: tuple[str, ...] = ("properties", "user_traits")

#: Names a column mapping may assign (canonical event field -> source column / key).
MAPPABLE_FIELDS: frozenset[str] = frozenset([*TOP_FIELDS, *PROPERTY_FIELDS, *OBJECT_FIELDS])

_SQL_TYPE: dict[FieldKind, str] = {
    "id": "VARCHAR",
    "text": "VARCHAR",
    "int": "INTEGER",
    "number": "DOUBLE",
    "bool": "BOOLEAN",
    "timestamp": "VARCHAR",
}
_EXPECTED: dict[FieldKind, str] = {
    "id": "a string",
    "text": "a string",
    "int": "an integer",
    "number": "a number",
    "bool": "a boolean",
    "timestamp": "an ISO-8601 string",
}
_NULL_PATCH = orjson.dumps(dict.fromkeys(PROPERTY_FIELDS)).decode()


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuarantineRecord:
    """One record that could not be accepted: where it came from, why, and its text."""

    source: str
    location: str
    reason: str
    raw: str


@dataclass(frozen=True)
class ValidatedBatch:
    """The result of validation: events ready to store, quarantined records and counts.

    ``events`` has exactly :data:`EVENT_ARROW_SCHEMA`; ``quarantine`` has
    :data:`QUARANTINE_ARROW_SCHEMA`. ``received`` counts every record looked at
    (``received == accepted + filtered + duplicates + quarantined``). ``origin`` names the
    file or stream the batch came from, for per-file reports.
    """

    events: pa.Table
    quarantine: pa.Table
    source: str
    received: int
    filtered: int = 0
    duplicates: int = 0
    origin: str | None = None

    @property
    def accepted(self) -> int:
        """Events that passed validation, the filter and in-batch dedupe."""
        return self.events.num_rows

    @property
    def quarantined(self) -> int:
        return self.quarantine.num_rows

    @property
    def quarantine_records(self) -> list[QuarantineRecord]:
        return [QuarantineRecord(**r) for r in self.quarantine.to_pylist()]

    @classmethod
    def empty(cls, source: str, origin: str | None = None) -> ValidatedBatch:
        return cls(
            events=EVENT_ARROW_SCHEMA.empty_table(),
            quarantine=QUARANTINE_ARROW_SCHEMA.empty_table(),
            source=source,
            received=0,
            origin=origin,
        )


def quarantine_table(records: Sequence[QuarantineRecord]) -> pa.Table:
    """Quarantine records as a :data:`QUARANTINE_ARROW_SCHEMA` table."""
    return pa.Table.from_pylist([r.__dict__ for r in records], schema=QUARANTINE_ARROW_SCHEMA)


# -- the private SQL engine ------------------------------------------------------------------

#: DuckDB threads per validation query. Files are validated block by block in parallel
#: worker threads (featurerec.events.ingest.VALIDATION_WORKERS), which costs less CPU than
#: splitting one query over threads.
VALIDATION_THREADS = 1

_local = threading.local()
_db_lock = threading.Lock()
_db: duckdb.DuckDBPyConnection | None = None

_MACROS = (
    # Human words for json_type() results, used only in error messages.
    """CREATE OR REPLACE MACRO _fr_jt(t) AS CASE t
        WHEN 'VARCHAR' THEN 'a string' WHEN 'UBIGINT' THEN 'an integer'
        WHEN 'BIGINT' THEN 'an integer' WHEN 'DOUBLE' THEN 'a number'
        WHEN 'BOOLEAN' THEN 'a boolean' WHEN 'OBJECT' THEN 'an object'
        WHEN 'ARRAY' THEN 'an array' WHEN 'NULL' THEN 'null' ELSE lower(t) END""",
    # Short quoted excerpt of a value for messages.
    """CREATE OR REPLACE MACRO _fr_q(v) AS
        '''' || CASE WHEN length(v) > 60 THEN left(v, 57) || '...' ELSE v END || ''''""",
)


def _connection() -> duckdb.DuckDBPyConnection:
    """This thread's cursor on the shared in-memory validation database (UTC session)."""
    global _db
    con: duckdb.DuckDBPyConnection | None = getattr(_local, "con", None)
    if con is None:
        with _db_lock:
            if _db is None:
                _db = duckdb.connect(":memory:", config={"threads": VALIDATION_THREADS})
                for m in _MACROS:
                    _db.execute(m)
            con = _db.cursor()
        con.execute("SET TimeZone = 'UTC'")
        _local.con = con
    return con


def _lit(text: str) -> str:
    """A SQL string literal for text we generate (structure JSON, labels): quotes doubled."""
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    """A quoted SQL identifier (column / struct key names come from files and mappings)."""
    return '"' + name.replace('"', '""') + '"'


# -- per-field SQL -----------------------------------------------------------------------------
#
# Each input shape (JSON lines, Arrow tables) has a "stage A" relation exposing leaf
# columns, and for every event field a value expression plus the rules that field can break.
# A rule has a cheap `suspect` test evaluated on every row, an `exact` test evaluated only on
# suspected rows, and a `message`. The main query computes values and one boolean `_suspect`
# per row; reasons are computed by a second query over the suspected rows only, so the
# common case (all rows fine) pays only for cheap tests.


@dataclass(frozen=True)
class _Rule:
    """One way a record can be wrong (SQL fragments over the stage relation)."""

    suspect: str
    message: str
    exact: str = "true"


@dataclass(frozen=True)
class _Field:
    """An event field's value expression and the rules it can break."""

    value: str
    rules: tuple[_Rule, ...] = ()


_NULL = _Field("NULL")


def _leaf_type(kind: FieldKind) -> str:
    """The from_json leaf type for a field: text kinds are read as VARCHAR (scalars become
    text), typed kinds as JSON so their type can be checked exactly."""
    return "VARCHAR" if kind in ("id", "text", "timestamp") else "JSON"


def _json_field(kind: FieldKind, v: str, label: str, exact: str) -> _Field:
    """Field from a from_json leaf ``v`` (see :func:`_leaf_type`); ``exact`` is a JSON
    expression of the same value used only on suspected rows (to name its JSON type)."""
    if kind in ("id", "text", "timestamp"):
        # A VARCHAR leaf holds scalars as text and objects/arrays as their JSON text.
        rule = _Rule(
            suspect=f"left({v}, 1) IN ('{{', '[')",
            exact=f"json_type({exact}) IN ('OBJECT', 'ARRAY')",
            message=f"{_lit(f'{label}: expected {_EXPECTED[kind]}, got ')} || _fr_jt(json_type({exact}))",
        )
        return _Field(v, (rule,))
    got = f"_fr_jt(json_type({v}))"
    if kind == "bool":
        text = f"CAST({v} AS VARCHAR)"
        value = f"CASE {text} WHEN 'true' THEN true WHEN 'false' THEN false END"
        rule = _Rule(
            suspect=f"{v} IS NOT NULL AND {text} NOT IN ('true', 'false')",
            message=f"{_lit(f'{label}: expected a boolean, got ')} || {got}",
        )
        return _Field(value, (rule,))
    # Numbers: a JSON number's text casts to DOUBLE; strings ('"12"'), booleans and objects
    # do not, so they are rejected without parsing JSON again.
    d = f"TRY_CAST(CAST({v} AS VARCHAR) AS DOUBLE)"
    not_number = _Rule(
        suspect=f"{v} IS NOT NULL AND ({d} IS NULL OR NOT isfinite({d}))",
        message=f"{_lit(f'{label}: expected {_EXPECTED[kind]}, got ')} || {got}",
    )
    if kind == "number":
        return _Field(d, (not_number,))
    return _Field(
        f"TRY_CAST({d} AS INTEGER)",
        (
            not_number,
            _Rule(
                suspect=f"{d} <> floor({d})",
                message=f"{_lit(label + ': expected an integer, got ')} || CAST({v} AS VARCHAR)",
            ),
            _Rule(
                suspect=f"{d} < -2147483648 OR {d} > 2147483647",
                message=f"{_lit(label + ': out of range for a 32-bit integer (got ')} "
                f"|| CAST({v} AS VARCHAR) || ')'",
            ),
        ),
    )


def _json_path(key: str) -> str:
    """A DuckDB JSON path literal for one top-level key (quoted, so any key works)."""
    return _lit("$." + orjson.dumps(key).decode())


def _native_field(kind: FieldKind, c: str, t: pa.DataType, label: str) -> _Field:
    """Field from a column ``c`` of Arrow type ``t`` (tables: Parquet, CSV, Arrow)."""
    is_str = pa.types.is_string(t) or pa.types.is_large_string(t)
    scalar = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
    wrong_type = _Field(
        "NULL",
        (
            _Rule(
                suspect=f"{c} IS NOT NULL",
                message=_lit(f"{label}: expected {_EXPECTED[kind]}, got a column of type {t}"),
            ),
        ),
    )
    if kind in ("id", "text", "timestamp"):
        if is_str:
            return _Field(c)
        if kind != "timestamp" and scalar:
            # Same rule as for JSON input: scalars are accepted as text.
            return _Field(f"CAST({c} AS VARCHAR)")
        if kind == "timestamp" and (pa.types.is_timestamp(t) or pa.types.is_date(t)):
            # Typed timestamps pass through; the cast to TIMESTAMPTZ takes naive ones as UTC
            # (the session time zone) and converts zoned ones.
            return _Field(c)
        return wrong_type
    if not (is_str or scalar) or (kind != "bool" and pa.types.is_boolean(t)):
        return wrong_type
    if kind == "bool" and not (is_str or pa.types.is_boolean(t)):
        return wrong_type
    src = f"trim({c})" if is_str else c
    value = f"TRY_CAST({src} AS {_SQL_TYPE[kind]})"
    rules = [
        _Rule(
            suspect=f"{c} IS NOT NULL AND {value} IS NULL",
            message=f"{_lit(label + ': cannot read ')} || _fr_q(CAST({c} AS VARCHAR)) "
            f"|| {_lit(' as ' + _EXPECTED[kind])}",
        )
    ]
    if kind == "int":
        d = f"TRY_CAST({src} AS DOUBLE)"
        rules.append(
            _Rule(
                suspect=f"{d} <> floor({d})",
                message=f"{_lit(label + ': expected an integer, got ')} || CAST({c} AS VARCHAR)",
            )
        )
    return _Field(value, tuple(rules))


@dataclass(frozen=True)
class _Plan:
    """Stage A for one input shape: the relation over ``_fr_in`` and the field expressions."""

    relation: str
    fields: dict[str, _Field]
    pre_rules: tuple[_Rule, ...] = ()


def _rules(plan: _Plan) -> list[_Rule]:
    """Every rule in the order reasons are given (the first that holds is the reason)."""
    f = plan.fields
    missing = ", ".join(
        f"CASE WHEN {f[name].value} IS NULL THEN '{name}' END" for name in REQUIRED_FIELDS
    )
    rules: list[_Rule] = list(plan.pre_rules)
    rules.append(
        _Rule(
            suspect=" OR ".join(f"({f[name].value}) IS NULL" for name in REQUIRED_FIELDS),
            message=f"'missing required field(s): ' || concat_ws(', ', {missing})",
        )
    )
    for name in [*TOP_FIELDS, *PROPERTY_FIELDS, *OBJECT_FIELDS]:
        rules.extend(f[name].rules)
    for name in ("event_id", "user_id", "event_type"):
        v = f[name].value
        rules.append(
            _Rule(
                suspect=f"left({v}, 1) IN ('', ' ')",
                exact=f"trim({v}) = ''",
                message=f"'{name}: must not be empty'",
            )
        )
    rules.append(
        _Rule(
            suspect="_fr_tstz IS NULL OR NOT isfinite(_fr_tstz)",
            message="'timestamp: not an ISO-8601 timestamp (got ' || "
            f"_fr_q(CAST({f['timestamp'].value} AS VARCHAR)) || ')'",
        )
    )
    rules.append(
        _Rule(
            suspect="_fr_tstz > $max_ts",
            message="'timestamp: ' || strftime(_fr_tstz, '%Y-%m-%dT%H:%M:%SZ') || ' is more than ' "
            "|| $skew || ' s after the ingestion time ' || strftime($now, '%Y-%m-%dT%H:%M:%SZ')",
        )
    )
    return rules


#: Placeholder in a plan's relation for the filter condition, right after parsing.
_KEEP = "__FR_KEEP__"


def _with_tstz(plan: _Plan, keep: str = "true") -> str:
    relation = plan.relation.replace(_KEEP, keep)
    return (
        f"SELECT *, TRY_CAST({plan.fields['timestamp'].value} AS TIMESTAMPTZ) AS _fr_tstz "
        f"FROM ({relation}) s"
    )


def _main_sql(plan: _Plan) -> str:
    """Values of every event field plus ``_fr_suspect`` (some rule may hold) per row."""
    suspect = " OR ".join(f"({r.suspect})" for r in _rules(plan))
    values = ", ".join(
        f"{plan.fields[n].value} AS {_ident(n)}"
        for n in EVENT_ARROW_SCHEMA.names
        if n != "timestamp"
    )
    et = plan.fields["event_type"].value
    # The include/exclude filter goes first, so noise types cost no further checks. Rows
    # whose event_type is missing or not plain text stay: the rules give them a reason.
    passes = (
        f"(len(CAST($include AS VARCHAR[])) = 0 OR list_contains(CAST($include AS VARCHAR[]), {et})) "
        f"AND NOT list_contains(CAST($exclude AS VARCHAR[]), {et})"
    )
    dropped = f"{et} IS NOT NULL AND left({et}, 1) NOT IN ('{{', '[') AND NOT ({passes})"
    keep = f"NOT coalesce({dropped}, false)"
    return (
        f"SELECT _pos, coalesce({suspect}, false) AS _fr_suspect, "
        f'CAST(_fr_tstz AS TIMESTAMP) AS "timestamp", {values} '
        f"FROM ({_with_tstz(plan, keep)}) s"
    )


def _reason_sql(plan: _Plan) -> str:
    """The reason of each row (NULL when a suspicion was unfounded)."""
    whens = " ".join(f"WHEN ({r.suspect}) AND ({r.exact}) THEN {r.message}" for r in _rules(plan))
    return f"SELECT _pos, CASE {whens} END AS _reason FROM ({_with_tstz(plan)}) s"


# -- stage A for JSON lines -------------------------------------------------------------------


def _lines_plan(mapping: Mapping[str, str], *, tolerant: bool) -> _Plan:
    """Stage A over ``_fr_in(_pos, line)``: each line parsed once by from_json.

    ``tolerant=False`` is the fast form: a line that is not JSON makes the whole query fail
    (the caller then reruns with ``tolerant=True``, where such lines are NULL and get a
    reason).
    """
    key = {f: mapping.get(f, f) for f in MAPPABLE_FIELDS}
    leaves: dict[str, str] = {}
    for f, kind in [*TOP_FIELDS.items(), *PROPERTY_FIELDS.items()]:
        leaves[key[f]] = _leaf_type(kind)
    for f in OBJECT_FIELDS:
        leaves[key[f]] = "JSON"
    structure = orjson.dumps(leaves).decode()
    prop_structure = orjson.dumps({f: _leaf_type(k) for f, k in PROPERTY_FIELDS.items()}).decode()

    def label(f: str, nested: bool = False) -> str:
        base = f"properties.{f}" if nested else f
        return base if key[f] == f else f"{base} (from {key[f]!r})"

    fields: dict[str, _Field] = {}
    for f, kind in TOP_FIELDS.items():
        exact = f"json_extract(line, {_json_path(key[f])})"
        fields[f] = _json_field(kind, f"_fr_j.{_ident(key[f])}", label(f), exact)
    for f, kind in PROPERTY_FIELDS.items():
        v = f"coalesce(_fr_p.{_ident(f)}, _fr_j.{_ident(key[f])})"
        exact = (
            f"coalesce(json_extract(_fr_pobj, {_json_path(f)}), "
            f"json_extract(line, {_json_path(key[f])}))"
        )
        fields[f] = _json_field(kind, v, label(f, nested=True), exact)
    pr = f"_fr_j.{_ident(key['properties'])}"
    ut = f"_fr_j.{_ident(key['user_traits'])}"

    def obj(x: str) -> str:
        # An object value, or JSON text of an object inside a string (the flat shape).
        return (
            f"CASE left({x}, 1) WHEN '{{' THEN {x} WHEN '\"' THEN "
            f"CASE WHEN json_type(TRY(CAST({x} ->> '$' AS JSON))) = 'OBJECT' "
            f"THEN TRY(CAST({x} ->> '$' AS JSON)) END END"
        )

    def obj_rule(x: str, o: str, what: str) -> _Rule:
        return _Rule(
            suspect=f"{x} IS NOT NULL AND {o} IS NULL",
            message=f"{_lit(what + ': expected an object, got ')} || CASE WHEN left({x}, 1) = '\"' "
            f"THEN 'a string that is not JSON of an object' ELSE _fr_jt(json_type({x})) END",
        )

    fields["properties"] = _Field(
        "CASE WHEN _fr_pobj IS NOT NULL THEN "
        f"NULLIF(CAST(json_merge_patch(_fr_pobj, {_lit(_NULL_PATCH)}) AS VARCHAR), '{{}}') END",
        (obj_rule(pr, "_fr_pobj", label("properties")),),
    )
    fields["user_traits"] = _Field(
        "CAST(_fr_utobj AS VARCHAR)", (obj_rule(ut, "_fr_utobj", label("user_traits")),)
    )
    no_field = " AND ".join(f"_fr_j.{_ident(k)} IS NULL" for k in leaves)
    pre = (
        _Rule(suspect="_fr_j IS NULL", message="'invalid JSON'"),
        _Rule(
            suspect=no_field,
            exact="json_type(line) <> 'OBJECT'",
            message="'not a JSON object (got ' || _fr_jt(json_type(line)) || ')'",
        ),
    )
    # TRY(from_json(...)) would also do, but DuckDB then evaluates every vector holding a
    # bad line row by row (~3x slower); json_valid() is one cheap extra pass.
    source = "CASE WHEN json_valid(line) THEN line END" if tolerant else "line"
    parsed = f"from_json({source}, {_lit(structure)})"
    relation = f"""
SELECT *, from_json(_fr_pobj, {_lit(prop_structure)}) AS _fr_p
FROM (
    SELECT _pos, line, _fr_j, {obj(pr)} AS _fr_pobj, {obj(ut)} AS _fr_utobj
    FROM (SELECT _pos, line, {parsed} AS _fr_j FROM _fr_in)
    WHERE {_KEEP}
)"""
    return _Plan(relation, fields, pre)


# -- stage A for Arrow tables -----------------------------------------------------------------


def _table_plan(schema: pa.Schema, mapping: Mapping[str, str]) -> _Plan:
    """Stage A over ``_fr_in`` (a table whose columns follow ``schema``)."""
    names = set(schema.names)
    key = {f: mapping.get(f, f) for f in MAPPABLE_FIELDS}

    def label(f: str, nested: bool = False) -> str:
        base = f"properties.{f}" if nested else f
        return base if key[f] == f else f"{base} (from column {key[f]!r})"

    def col(name: str) -> str:
        return f"s.{_ident(name)}"

    fields: dict[str, _Field] = {}
    for f, kind in TOP_FIELDS.items():
        c = key[f]
        fields[f] = (
            _native_field(kind, col(c), schema.field(c).type, label(f)) if c in names else _NULL
        )

    # properties: a struct/map column (nested shape) or JSON text (flat shape / CSV).
    pcol = key["properties"]
    ptype = schema.field(pcol).type if pcol in names else None
    plabel = label("properties")
    p_json: str | None = None
    children: dict[str, pa.DataType] = {}
    fields["properties"] = _NULL
    if ptype is None:
        pass
    elif pa.types.is_struct(ptype):
        children = {ptype.field(i).name: ptype.field(i).type for i in range(ptype.num_fields)}
        extras = [n for n in children if n not in PROPERTY_FIELDS]
        if extras:
            packed = ", ".join(f"{_ident(n)} := {col(pcol)}.{_ident(n)}" for n in extras)
            # json_merge_patch onto {} drops the nulls Arrow put where a key was absent.
            fields["properties"] = _Field(
                f"NULLIF(CAST(json_merge_patch('{{}}', to_json(struct_pack({packed}))) AS VARCHAR), '{{}}')"
            )
    elif pa.types.is_string(ptype) or pa.types.is_large_string(ptype) or pa.types.is_map(ptype):
        src = col(pcol)
        p_json = f"to_json({src})" if pa.types.is_map(ptype) else f"TRY(CAST({src} AS JSON))"
        fields["properties"] = _Field(
            "CASE WHEN json_type(_fr_pobj) = 'OBJECT' THEN "
            f"NULLIF(CAST(json_merge_patch(_fr_pobj, {_lit(_NULL_PATCH)}) AS VARCHAR), '{{}}') END",
            (
                _Rule(
                    suspect=f"{src} IS NOT NULL AND (_fr_pobj IS NULL OR json_type(_fr_pobj) <> 'OBJECT')",
                    message=f"{_lit(plabel + ': expected a JSON object, got ')} "
                    f"|| _fr_q(CAST({src} AS VARCHAR))",
                ),
            ),
        )
    else:
        fields["properties"] = _Field(
            "NULL",
            (
                _Rule(
                    suspect=f"{col(pcol)} IS NOT NULL",
                    message=_lit(f"{plabel}: expected an object, got a column of type {ptype}"),
                ),
            ),
        )

    for f, kind in PROPERTY_FIELDS.items():
        options: list[_Field] = []
        if f in children:
            options.append(
                _native_field(kind, f"{col(pcol)}.{_ident(f)}", children[f], label(f, True))
            )
        if p_json is not None:
            exact = f"json_extract(_fr_pobj, {_json_path(f)})"
            options.append(_json_field(kind, f"_fr_p.{_ident(f)}", label(f, True), exact))
        if key[f] in names:
            options.append(_native_field(kind, col(key[f]), schema.field(key[f]).type, label(f)))
        if not options:
            fields[f] = _NULL
        elif len(options) == 1:
            fields[f] = options[0]
        else:
            fields[f] = _Field(
                f"coalesce({', '.join(o.value for o in options)})",
                tuple(r for o in options for r in o.rules),
            )

    ucol = key["user_traits"]
    utype = schema.field(ucol).type if ucol in names else None
    ulabel = label("user_traits")
    ut_text = utype is not None and (pa.types.is_string(utype) or pa.types.is_large_string(utype))
    if utype is None:
        fields["user_traits"] = _NULL
    elif pa.types.is_struct(utype) or pa.types.is_map(utype):
        fields["user_traits"] = _Field(
            f"CAST(json_merge_patch('{{}}', to_json({col(ucol)})) AS VARCHAR)"
        )
    elif ut_text:
        fields["user_traits"] = _Field(
            "CASE WHEN json_type(_fr_utobj) = 'OBJECT' THEN CAST(_fr_utobj AS VARCHAR) END",
            (
                _Rule(
                    suspect=f"{col(ucol)} IS NOT NULL AND (_fr_utobj IS NULL OR json_type(_fr_utobj) <> 'OBJECT')",
                    message=f"{_lit(ulabel + ': expected a JSON object, got ')} || _fr_q({col(ucol)})",
                ),
            ),
        )
    else:
        fields["user_traits"] = _Field(
            "NULL",
            (
                _Rule(
                    suspect=f"{col(ucol)} IS NOT NULL",
                    message=_lit(f"{ulabel}: expected an object, got a column of type {utype}"),
                ),
            ),
        )

    extra_cols = []
    if p_json is not None:
        extra_cols.append(f"{p_json} AS _fr_pobj")
    if ut_text:
        extra_cols.append(f"TRY(CAST({col(ucol)} AS JSON)) AS _fr_utobj")
    inner = f"SELECT {', '.join(['s.*', *extra_cols])} FROM _fr_in s WHERE {_KEEP}"
    if p_json is not None:
        p_struct = orjson.dumps({f: _leaf_type(k) for f, k in PROPERTY_FIELDS.items()}).decode()
        inner = f"SELECT *, from_json(_fr_pobj, {_lit(p_struct)}) AS _fr_p FROM ({inner})"
    # Field expressions say s."col": the relation is aliased s for them.
    return _Plan(f"SELECT * FROM ({inner}) s", fields)


# -- driver -------------------------------------------------------------------------------------


def _check_mapping(mapping: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(mapping or {})
    unknown = sorted(set(out) - MAPPABLE_FIELDS)
    if unknown:
        raise DataError(
            f"column mapping: unknown event field(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(MAPPABLE_FIELDS))}"
        )
    for k, v in out.items():
        if not isinstance(v, str) or not v:
            raise DataError(f"column mapping: {k}= needs a source column name (got {v!r})")
    return out


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _validate(
    plan_fast: _Plan,
    plan_tolerant: _Plan | None,
    data: pa.Table,
    params: dict[str, Any],
) -> tuple[pa.Table, pa.Table]:
    """Run stage A+B over ``data``: (values per row with ``_fr_suspect``, reasons of bad rows).

    The reasons table has ``_pos`` and ``_reason`` for the rows that break a rule.
    """
    try:
        result = _run(_main_sql(plan_fast), data, params)
        plan = plan_fast
    except duckdb.Error:
        if plan_tolerant is None:
            raise
        result = _run(_main_sql(plan_tolerant), data, params)
        plan = plan_tolerant
    suspect = result.column("_fr_suspect")
    if not (pc.any(suspect).as_py() or False):
        return result, _EMPTY_REASONS
    positions = pc.filter(result.column("_pos"), suspect)
    subset = data.take(positions)
    reasons = _run(_reason_sql(plan), subset, params)
    reasons = reasons.filter(pc.is_valid(reasons.column("_reason")))
    return result, reasons


_EMPTY_REASONS = pa.table({"_pos": pa.array([], pa.int64()), "_reason": pa.array([], pa.string())})


def _finish(
    result: pa.Table,
    reasons: pa.Table,
    *,
    settings: Settings,
    source: str,
    received: int,
    locations: Any,
    raw_of: Any,
    origin: str | None,
    extra_quarantine: Sequence[QuarantineRecord] = (),
) -> ValidatedBatch:
    """Split the result into events / quarantine, apply the filter, dedupe in batch.

    One boolean mask is built with numpy and the table is filtered once (each Arrow filter
    copies every column, so chaining them costs more than the checks).
    """
    q_records: list[dict[str, Any]] = [r.__dict__ for r in extra_quarantine]
    n = result.num_rows
    pos = result.column("_pos").to_numpy()
    keep = np.ones(n, dtype=bool)
    if reasons.num_rows:
        bad_pos = reasons.column("_pos").to_numpy()
        for p_, why in zip(bad_pos.tolist(), reasons.column("_reason").to_pylist(), strict=True):
            q_records.append(
                {"source": source, "location": locations(p_), "reason": why, "raw": raw_of(p_)}
            )
        keep &= ~np.isin(pos, bad_pos)
    # Rows the SQL filter dropped never came back; the check below catches the rare event
    # type that only looked like JSON text to the SQL filter.
    filtered = received - n
    ing = settings.ingest
    if n and (ing.include_types or ing.exclude_types):
        et = result.column("event_type")
        passes = pc.invert(pc.is_in(et, value_set=pa.array(ing.exclude_types, pa.string())))
        if ing.include_types:
            passes = pc.and_(
                passes, pc.is_in(et, value_set=pa.array(ing.include_types, pa.string()))
            )
        ok = passes.to_numpy(zero_copy_only=False)
        filtered += int(np.count_nonzero(keep & ~ok))
        keep &= ok
    duplicates = 0
    if n:
        ids = result.column("event_id")
        uniq = pc.unique(ids)
        if len(uniq) < n:  # some id repeats (maybe only among dropped rows)
            codes = pc.index_in(ids, value_set=uniq).to_numpy(zero_copy_only=False)
            kept = np.flatnonzero(keep)
            order = kept[np.argsort(pos[kept], kind="stable")]
            _, first = np.unique(codes[order], return_index=True)
            duplicates = len(order) - len(first)
            if duplicates:
                keep = np.zeros(n, dtype=bool)
                keep[order[first]] = True
    good = result if keep.all() else result.filter(pa.array(keep))
    events = good.select(EVENT_ARROW_SCHEMA.names).cast(EVENT_ARROW_SCHEMA)
    quarantine = pa.Table.from_pylist(q_records, schema=QUARANTINE_ARROW_SCHEMA)
    return ValidatedBatch(
        events=events,
        quarantine=quarantine,
        source=source,
        received=received,
        filtered=filtered,
        duplicates=duplicates,
        origin=origin,
    )


def _params(settings: Settings, now: datetime | None) -> dict[str, Any]:
    now = now or _utcnow()
    skew = settings.ingest.max_future_skew_seconds
    return {
        "now": now,
        "max_ts": now + timedelta(seconds=skew),
        "skew": skew,
        "include": list(settings.ingest.include_types),
        "exclude": list(settings.ingest.exclude_types),
    }


#: Rows per Arrow record batch handed to DuckDB: it scans batches in parallel.
_SCAN_BATCH_ROWS = 8192


def _run(sql: str, data: pa.Table, params: dict[str, Any]) -> pa.Table:
    """Run ``sql`` with ``data`` visible as ``_fr_in`` on this thread's connection."""
    con = _connection()
    con.register("_fr_in", pa.Table.from_batches(data.to_batches(max_chunksize=_SCAN_BATCH_ROWS)))
    used = {k: v for k, v in params.items() if f"${k}" in sql}
    try:
        return con.sql(sql, params=used or None).to_arrow_table()
    finally:
        con.unregister("_fr_in")


def _cut(text: str) -> str:
    return text if len(text) <= MAX_RAW_CHARS else text[: MAX_RAW_CHARS - 3] + "..."


def normalize_lines(
    lines: pa.Array | pa.ChunkedArray | Sequence[str],
    *,
    settings: Settings,
    source: str,
    locations: Sequence[str] | None = None,
    location_prefix: str | None = None,
    line_numbers: np.ndarray | None = None,
    first_line: int = 1,
    mapping: Mapping[str, str] | None = None,
    now: datetime | None = None,
    origin: str | None = None,
) -> ValidatedBatch:
    """Validate JSON text records, one per element of ``lines`` (the NDJSON fast path).

    A record's location is ``locations[i]`` when given, else
    ``"{location_prefix}:{line number}"`` where line numbers are ``line_numbers[i]`` or
    ``first_line + i``. ``mapping`` renames top-level keys (canonical field -> key).
    """
    mapping = _check_mapping(mapping)
    arr = lines if isinstance(lines, pa.Array | pa.ChunkedArray) else pa.array(lines, pa.string())
    n = len(arr)
    if n == 0:
        return ValidatedBatch.empty(source, origin)
    prefix = location_prefix or source
    if locations is not None:
        if len(locations) != n:
            raise ValueError(f"locations has {len(locations)} entries for {n} records")
        locs = list(locations)

        def loc_of(pos: int) -> str:
            return locs[pos]
    else:
        numbers = line_numbers if line_numbers is not None else None

        def loc_of(pos: int) -> str:
            no = int(numbers[pos]) if numbers is not None else first_line + pos
            return f"{prefix}:{no}"

    def raw_of(pos: int) -> str:
        value = arr[pos].as_py()
        return _cut(value.rstrip("\r\n") if isinstance(value, str) else "")

    data = pa.table({"_pos": pa.array(np.arange(n, dtype=np.int64)), "line": arr})
    result, reasons = _validate(
        _lines_plan(mapping, tolerant=False),
        _lines_plan(mapping, tolerant=True),
        data,
        _params(settings, now),
    )
    reasons = _explain_invalid_json(reasons, arr)
    return _finish(
        result,
        reasons,
        settings=settings,
        source=source,
        received=n,
        locations=loc_of,
        raw_of=raw_of,
        origin=origin,
    )


def _explain_invalid_json(result: pa.Table, arr: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Replace the bare 'invalid JSON' reason by the parser's message (few rows, Python)."""
    if result.num_rows == 0:
        return result
    reason = result.column("_reason")
    mask = pc.equal(reason, "invalid JSON")
    if not (pc.any(mask).as_py() or False):
        return result
    positions = result.column("_pos").to_numpy()
    reasons = reason.to_pylist()
    for i in np.flatnonzero(mask.to_numpy(zero_copy_only=False)).tolist():
        text = arr[int(positions[i])].as_py() or ""
        try:
            orjson.loads(text)
            msg = "invalid JSON"
        except orjson.JSONDecodeError as exc:
            msg = f"invalid JSON: {exc}"
        reasons[i] = msg
    return result.set_column(
        result.schema.get_field_index("_reason"), "_reason", pa.array(reasons, pa.string())
    )


def normalize_records(
    records: Iterable[Mapping[str, Any] | str | bytes],
    *,
    settings: Settings,
    source: str,
    first_location: int = 1,
    location_prefix: str | None = None,
    locations: Sequence[str] | None = None,
    mapping: Mapping[str, str] | None = None,
    now: datetime | None = None,
    origin: str | None = None,
) -> ValidatedBatch:
    """Validate events given as Python objects or raw JSON text / bytes.

    Dicts may be in the spec's nested shape or the flat shape (``properties`` and
    ``user_traits`` as JSON text, promoted properties at the top level); ``datetime``
    values are accepted for ``timestamp``. Record ``i`` is located at ``locations[i]`` when
    given, else ``"{location_prefix or source}:{first_location + i}"`` (e.g. Kafka passes
    ``topic[partition]@offset`` per message).
    """
    texts: list[str | None] = []
    pre_bad: list[tuple[int, str, str]] = []
    for i, rec in enumerate(records):
        try:
            if isinstance(rec, str):
                texts.append(rec)
            elif isinstance(rec, bytes | bytearray | memoryview):
                texts.append(bytes(rec).decode("utf-8"))
            else:
                texts.append(orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY).decode())
        except UnicodeDecodeError as exc:
            texts.append(None)
            pre_bad.append((i, f"not valid UTF-8: {exc.reason} at byte {exc.start}", _raw(rec)))
        except TypeError as exc:
            texts.append(None)
            pre_bad.append((i, f"not JSON-serialisable: {exc}", _raw(rec)))
    n = len(texts)
    prefix = location_prefix or source

    def loc_of(pos: int) -> str:
        return locations[pos] if locations is not None else f"{prefix}:{first_location + pos}"

    if locations is not None and len(locations) != n:
        raise ValueError(f"locations has {len(locations)} entries for {n} records")
    extra = [QuarantineRecord(source, loc_of(i), why, raw) for i, why, raw in pre_bad]
    keep = [i for i, t in enumerate(texts) if t is not None]
    if len(keep) < n:
        good_locs = [loc_of(i) for i in keep]
        batch = normalize_lines(
            [texts[i] for i in keep],  # type: ignore[misc]
            settings=settings,
            source=source,
            locations=good_locs,
            mapping=mapping,
            now=now,
            origin=origin,
        )
        q = pa.concat_tables([quarantine_table(extra), batch.quarantine])
        return ValidatedBatch(
            events=batch.events,
            quarantine=q,
            source=source,
            received=n,
            filtered=batch.filtered,
            duplicates=batch.duplicates,
            origin=origin,
        )
    return normalize_lines(
        texts,  # type: ignore[arg-type]
        settings=settings,
        source=source,
        locations=locations,
        location_prefix=prefix,
        first_line=first_location,
        mapping=mapping,
        now=now,
        origin=origin,
    )


def _raw(rec: Any) -> str:
    if isinstance(rec, bytes | bytearray | memoryview):
        return _cut(bytes(rec).decode("utf-8", errors="replace"))
    return _cut(rec if isinstance(rec, str) else repr(rec))


def normalize_table(
    table: pa.Table | pa.RecordBatch,
    *,
    settings: Settings,
    source: str,
    mapping: Mapping[str, str] | None = None,
    location_prefix: str | None = None,
    first_row: int = 1,
    now: datetime | None = None,
    origin: str | None = None,
) -> ValidatedBatch:
    """Validate an Arrow table of events (Parquet, CSV, Arrow from another system).

    Accepts the flat :data:`EVENT_ARROW_SCHEMA` shape, the spec's nested shape
    (``properties`` / ``user_traits`` struct columns) and, with ``mapping`` (canonical
    field -> column), other column names. Row ``i`` is located at
    ``"{location_prefix}:row {first_row + i}"``.
    """
    mapping = _check_mapping(mapping)
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    n = table.num_rows
    if n == 0:
        return ValidatedBatch.empty(source, origin)
    missing = [
        f"{f} (column {mapping[f]!r})" for f in mapping if mapping[f] not in table.column_names
    ]
    if missing:
        raise DataError(
            f"{location_prefix or source}: mapped column(s) not found: {', '.join(missing)}; "
            f"columns: {', '.join(table.column_names)}"
        )
    if "_pos" in table.column_names:
        table = table.drop_columns(["_pos"])
    data = table.append_column("_pos", pa.array(np.arange(n, dtype=np.int64)))
    prefix = location_prefix or source

    def loc_of(pos: int) -> str:
        return f"{prefix}:row {first_row + pos}"

    def raw_of(pos: int) -> str:
        row = table.slice(pos, 1).to_pylist()[0]
        return _cut(orjson.dumps(row, default=str, option=orjson.OPT_NON_STR_KEYS).decode())

    result, reasons = _validate(
        _table_plan(data.schema, mapping), None, data, _params(settings, now)
    )
    return _finish(
        result,
        reasons,
        settings=settings,
        source=source,
        received=n,
        locations=loc_of,
        raw_of=raw_of,
        origin=origin,
    )
