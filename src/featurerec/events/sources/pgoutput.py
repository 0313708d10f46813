"""Decoder for PostgreSQL's ``pgoutput`` logical replication protocol (version 1).

The messages are documented in the PostgreSQL manual, "Logical Replication Message Formats":
each starts with one byte naming it (``B`` begin, ``C`` commit, ``R`` relation, ``I`` insert,
``U`` update, ``D`` delete, ``T`` truncate, ``Y`` type, ``O`` origin, ``M`` message), followed
by big-endian integers, NUL-terminated strings and tuple data. Column values arrive as text
(``t``), null (``n``) or "unchanged TOASTed value" (``u``: the update did not touch a large
value, so it is not sent; :data:`UNCHANGED` marks it).

Values are converted from their text form by the column's type OID (:func:`convert_text`):
booleans, integers, floats, numerics, dates, timestamps (``timestamptz`` to UTC naive),
JSON (kept as JSON text), and one-dimensional arrays (to JSON text); anything else stays text.

Example::

    >>> msg = b"B" + (10).to_bytes(8, "big") + (0).to_bytes(8, "big") + (7).to_bytes(4, "big")
    >>> decode_message(msg)
    Begin(final_lsn=10, commit_time=0, xid=7)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson

from featurerec.errors import DataError


class _Unchanged:
    """Marker for an unchanged TOASTed column in an update (its value was not sent)."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    is_key: bool


@dataclass(frozen=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_time: int
    xid: int


@dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True)
class Insert:
    relation_oid: int
    new: tuple[str | _Unchanged | None, ...]


@dataclass(frozen=True)
class Update:
    relation_oid: int
    #: Old key ('K') or old full row ('O') when the replica identity sends it.
    old: tuple[str | _Unchanged | None, ...] | None
    new: tuple[str | _Unchanged | None, ...]


@dataclass(frozen=True)
class Delete:
    relation_oid: int
    #: Key columns ('K', other columns null) or the full old row ('O').
    old: tuple[str | _Unchanged | None, ...]


@dataclass(frozen=True)
class Truncate:
    relation_oids: tuple[int, ...]
    options: int


@dataclass(frozen=True)
class Other:
    """A message this decoder does not need (type, origin, logical message)."""

    kind: str


Message = Begin | Commit | Relation | Insert | Update | Delete | Truncate | Other


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def byte(self) -> str:
        b = self.buf[self.pos : self.pos + 1]
        if not b:
            raise DataError("pgoutput: message ends early")
        self.pos += 1
        return b.decode("ascii")

    def sint(self, size: int) -> int:
        fmt = {1: ">b", 2: ">h", 4: ">i", 8: ">q"}[size]
        if self.pos + size > len(self.buf):
            raise DataError("pgoutput: message ends early")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return int(v)

    def uint(self, size: int) -> int:
        fmt = {4: ">I", 8: ">Q"}[size]
        if self.pos + size > len(self.buf):
            raise DataError("pgoutput: message ends early")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return int(v)

    def string(self) -> str:
        end = self.buf.index(b"\x00", self.pos)
        s = self.buf[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return s

    def tuple_data(self) -> tuple[str | _Unchanged | None, ...]:
        n = self.sint(2)
        values: list[str | _Unchanged | None] = []
        for _ in range(n):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED)
            elif kind in ("t", "b"):
                size = self.sint(4)
                values.append(self.buf[self.pos : self.pos + size].decode("utf-8"))
                self.pos += size
            else:
                raise DataError(f"pgoutput: unknown tuple value kind {kind!r}")
        return tuple(values)


def decode_message(data: bytes | memoryview) -> Message:
    """Decode one pgoutput message (one row of ``pg_logical_slot_*_binary_changes``)."""
    r = _Reader(bytes(data))
    kind = r.byte()
    if kind == "B":
        return Begin(final_lsn=r.uint(8), commit_time=r.sint(8), xid=r.uint(4))
    if kind == "C":
        return Commit(
            flags=r.sint(1), commit_lsn=r.uint(8), end_lsn=r.uint(8), commit_time=r.sint(8)
        )
    if kind == "R":
        oid = r.uint(4)
        namespace = r.string()
        name = r.string()
        identity = chr(r.sint(1))
        ncols = r.sint(2)
        cols = []
        for _ in range(ncols):
            flags = r.sint(1)
            cname = r.string()
            type_oid = r.uint(4)
            r.sint(4)  # atttypmod
            cols.append(Column(cname, type_oid, bool(flags & 1)))
        return Relation(oid, namespace, name, identity, tuple(cols))
    if kind == "I":
        oid = r.uint(4)
        if r.byte() != "N":
            raise DataError("pgoutput: insert without new tuple")
        return Insert(oid, r.tuple_data())
    if kind == "U":
        oid = r.uint(4)
        tag = r.byte()
        old = None
        if tag in ("K", "O"):
            old = r.tuple_data()
            tag = r.byte()
        if tag != "N":
            raise DataError(f"pgoutput: update without new tuple (tag {tag!r})")
        return Update(oid, old, r.tuple_data())
    if kind == "D":
        oid = r.uint(4)
        tag = r.byte()
        if tag not in ("K", "O"):
            raise DataError(f"pgoutput: delete with unknown tuple tag {tag!r}")
        return Delete(oid, r.tuple_data())
    if kind == "T":
        n = r.sint(4)
        options = r.sint(1)
        return Truncate(tuple(r.uint(4) for _ in range(n)), options)
    return Other(kind)


def lsn_to_int(lsn: str) -> int:
    """``'0/153B468'`` → integer position."""
    try:
        hi, lo = lsn.split("/")
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError:
        raise DataError(f"not a PostgreSQL LSN: {lsn!r}") from None


def int_to_lsn(value: int) -> str:
    """Integer position → ``'0/153B468'``."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# -- text values → Python ------------------------------------------------------------------

_BOOL = 16
_INTS = {20, 21, 23, 26}
_FLOATS = {700, 701}
_NUMERIC = 1700
_DATE = 1082
_TIMESTAMP = 1114
_TIMESTAMPTZ = 1184
_JSON = {114, 3802}
#: Array type OIDs → element type OID (text, varchar, int4, int8, bool, float8, numeric).
_ARRAYS = {1009: 25, 1015: 1043, 1007: 23, 1016: 20, 1000: 16, 1022: 701, 1231: 1700}


def convert_text(text: str | None, type_oid: int) -> Any:
    """A column's text representation → Python value by its type OID (see module doc)."""
    if text is None:
        return None
    if type_oid == _BOOL:
        return text in ("t", "true")
    if type_oid in _INTS:
        return int(text)
    if type_oid in _FLOATS:
        return float(text)
    if type_oid == _NUMERIC:
        return float(Decimal(text))
    if type_oid == _DATE:
        return date.fromisoformat(text)
    if type_oid == _TIMESTAMP:
        return datetime.fromisoformat(text)
    if type_oid == _TIMESTAMPTZ:
        dt = datetime.fromisoformat(text)
        return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo else dt
    if type_oid in _JSON:
        return text
    if type_oid in _ARRAYS:
        elem = _ARRAYS[type_oid]
        return orjson.dumps([convert_text(v, elem) for v in parse_array(text)]).decode()
    return text


def parse_array(text: str) -> list[str | None]:
    """Parse a one-dimensional PostgreSQL array literal (``{a,"b c",NULL}``)."""
    if not (text.startswith("{") and text.endswith("}")):
        raise DataError(f"not a PostgreSQL array literal: {text!r}")
    body = text[1:-1]
    out: list[str | None] = []
    i, n = 0, len(body)
    while i < n:
        if body[i] == '"':
            i += 1
            buf = []
            while i < n and body[i] != '"':
                if body[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(body[i])
                i += 1
            out.append("".join(buf))
            i += 1  # closing quote
        else:
            j = body.find(",", i)
            j = n if j == -1 else j
            token = body[i:j]
            out.append(None if token == "NULL" else token)
            i = j
        if i < n and body[i] == ",":
            i += 1
    return out
