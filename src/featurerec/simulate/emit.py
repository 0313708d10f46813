"""Turn a chunk-day of integer-coded events into an ``EVENT_ARROW_SCHEMA`` table.

Strings are never built per event in Python: each column is a ``take`` from a small lookup
array (event types, feature names, user ids, user_traits JSON) or a vectorised hex id.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

import numpy as np
import orjson
import pyarrow as pa

from featurerec.events.schema import EVENT_ARROW_SCHEMA
from featurerec.simulate.catalog import (
    CORE_FEATURES,
    INDUSTRIES,
    N_GROUPS,
    PLANS,
    ROLES,
    event_type_catalog,
)
from featurerec.simulate.dynamics import DayEvents, EventCodes
from featurerec.simulate.ids import counters, hex_ids, mix64, seed_salt, take_strings, user_ids
from featurerec.simulate.population import Population, signup_cohort

#: EVENT_ARROW_SCHEMA with dictionary-encoded string columns (except event_id).
DICT_SCHEMA = pa.schema(
    [
        pa.field(f.name, pa.dictionary(pa.int32(), pa.string()), nullable=f.nullable)
        if f.type == pa.string() and f.name != "event_id"
        else f
        for f in EVENT_ARROW_SCHEMA
    ]
)

#: property strings by code (see dynamics: 0 landing page, 1..12 area pages, 13 signup, 14 churn)
PROPERTY_STRINGS: tuple[str, ...] = (
    '{"path":"/home"}',
    *[orjson.dumps({"path": f.path}).decode() for f in CORE_FEATURES],
    '{"method":"email_invite"}',
    '{"reason":"subscription_cancelled"}',
)


def event_codes() -> EventCodes:
    named, tail = event_type_catalog()
    types = (*named, *tail)
    index = {t: i for i, t in enumerate(types)}
    group_actions = [np.array([index[e] for e in f.action_events]) for f in CORE_FEATURES]
    tail_codes = np.array([index[t] for t in tail])
    ranks = np.arange(1, len(tail) + 1, dtype=np.float64)
    probs = 1.0 / ranks**1.1
    return EventCodes(
        types=types,
        type_index=index,
        group_actions=group_actions,
        tail_codes=tail_codes,
        tail_probs=probs / probs.sum(),
    )


class Emitter:
    """Lookup arrays shared by every chunk of one world."""

    def __init__(self, pop: Population, codes: EventCodes, seed: int, start: date) -> None:
        self.pop = pop
        self.seed = seed
        self.start_us = int(
            (datetime(start.year, start.month, start.day) - datetime(1970, 1, 1))
            / timedelta(microseconds=1)
        )
        self.start = start
        cat = pop.catalog
        self.types = pa.array(codes.types, pa.string())
        self.items = pa.array(cat.names, pa.string())
        actions: list[str] = []
        offs = np.zeros(cat.n, dtype=np.int64)
        for j, name in enumerate(cat.names):
            offs[j] = len(actions)
            if cat.is_core[j]:
                actions.extend(CORE_FEATURES[cat.group[j]].actions)
            else:
                actions.append("use_" + name.split("__", 1)[1].rsplit("_", 1)[0])
        self.actions = pa.array(actions, pa.string())
        self.action_off = offs
        ctx: list[str] = []
        coff = np.zeros(N_GROUPS, dtype=np.int64)
        for gi, f in enumerate(CORE_FEATURES):
            coff[gi] = len(ctx)
            ctx.extend(f.contexts)
        self.contexts = pa.array(ctx, pa.string())
        self.context_off = coff
        self.props = pa.array(PROPERTY_STRINGS, pa.string())
        self.evt_salt = seed_salt(seed, 1)
        self.sess_salt = seed_salt(seed, 2)

    def user_traits(self, u0: int, u1: int) -> pa.Array:
        """user_traits JSON per user (spec: role, team_size, plan, signup_cohort)."""
        pop = self.pop
        ws = pop.user_ws[u0:u1]
        out = []
        for r, seats, plan, ind, sd in zip(
            pop.user_role[u0:u1].tolist(),
            pop.ws_seats[ws].tolist(),
            pop.ws_plan[ws].tolist(),
            pop.ws_industry[ws].tolist(),
            pop.user_signup_day[u0:u1].tolist(),
            strict=True,
        ):
            out.append(
                orjson.dumps(
                    {
                        "role": ROLES[r],
                        "team_size": seats,
                        "plan": PLANS[plan],
                        "industry": INDUSTRIES[ind],
                        "signup_cohort": signup_cohort(self.start + timedelta(days=sd)),
                    }
                ).decode()
            )
        return pa.array(out, pa.string())

    def table(
        self,
        ev: DayEvents,
        chunk: int,
        users: pa.Array,
        workspaces: pa.Array,
        traits: pa.Array,
        *,
        dictionary: bool = False,
    ) -> pa.Table:
        """The events as ``EVENT_ARROW_SCHEMA`` (``dictionary=True``: string columns stay
        dictionary-encoded, for the Parquet writer; read back they are plain strings).

        ``users`` / ``workspaces`` / ``traits``: per local user of the chunk."""
        n = len(ev)
        eid = hex_ids("evt_", mix64(counters(chunk, ev.day, n) ^ self.evt_salt))
        sid_all = hex_ids("sess_", mix64(counters(chunk, ev.day, ev.n_sessions) ^ self.sess_salt))
        item = ev.item
        has_item = item >= 0
        g = np.where(has_item, self.pop.catalog.group[np.maximum(item, 0)], 0)
        act_idx = np.where(ev.action >= 0, self.action_off[np.maximum(item, 0)] + ev.action, -1)
        ctx_idx = np.where(ev.context >= 0, self.context_off[g] + ev.context, -1)
        ts = pa.array(ev.ts + self.start_us, type=pa.timestamp("us"))
        uidx = ev.user.astype(np.int32)
        cols = [
            eid,
            take_strings(users, uidx),
            _take_unique(workspaces, uidx),
            take_strings(self.types, ev.etype),
            ts,
            take_strings(self.items, item),
            take_strings(self.actions, act_idx),
            take_strings(self.contexts, ctx_idx),
            take_strings(sid_all, ev.session),
            pa.array(ev.seq, type=pa.int32(), mask=ev.seq == 0),
            pa.array(ev.top, type=pa.float64(), mask=np.isnan(ev.top)),
            pa.array(ev.first == 1, type=pa.bool_(), mask=ev.first < 0),
            take_strings(self.props, ev.prop),
            _take_unique(traits, np.where(ev.traits, uidx, -1)),
        ]
        table = pa.Table.from_arrays(cols, schema=DICT_SCHEMA)
        return table if dictionary else table.cast(EVENT_ARROW_SCHEMA)


def _take_unique(values: pa.Array, index: np.ndarray) -> pa.DictionaryArray:
    """Like :func:`take_strings` for per-user values that repeat (workspace ids, traits): the
    dictionary holds each distinct string once, so Parquet writes it without re-hashing."""
    enc = values.dictionary_encode()
    codes = enc.indices.to_numpy()
    idx = np.asarray(index)
    return take_strings(enc.dictionary, np.where(idx >= 0, codes[np.maximum(idx, 0)], -1))


def chunk_strings(pop: Population, u0: int, u1: int) -> tuple[pa.Array, pa.Array]:
    """user_id and workspace_id strings for the chunk's users."""
    from featurerec.simulate.ids import workspace_ids

    return user_ids(np.arange(u0, u1)), workspace_ids(pop.user_ws[u0:u1])
