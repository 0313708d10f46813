"""Day-by-day behaviour of one chunk of workspaces (vectorised over users, sessions, events).

The hidden utility of user ``u`` for item ``j`` (group ``g = group[j]``)::

    U[u, j] = base[j] + role[r_u, j] + plan[p_u, j] + size[b_u, j] + industry[i_u, j]
              + z_u . v_j + eps[u, j],            eps ~ N(0, noise_scale^2)

Each simulated day, for every user who is signed up and whose workspace has not churned:

1. **Activity**: active with probability ``active_base * engagement`` (weekends lower, new
   users higher); an active user has ``1 + Poisson`` sessions at work-hour start times.
2. **Organic adoption**: each eligible (plan, flag rollout), not yet used item is first used
   with hazard ``discover[j] * sigmoid(U - offset) * (1 + sum of boosts from adopted areas)
   * onboarding(age)``; a first use is kept (used again later) with probability
   ``sigmoid(keep_slope * (U - keep_offset))``. The first use is inserted into one of the
   day's sessions with ``is_first_use = true``: it is exactly the user's first use.
3. **Sessions**: a Markov chain over feature areas the user kept: the next area is drawn with
   weight ``T[current, next] * sum(exp(usage_gamma * U))`` over the user's items in that area
   (``T`` holds the spec's transition affinities; staying on a feature has its own weight);
   then a concrete item within the area by ``exp(usage_gamma * U)``. Around each use:
   page views, action events (task_created ...), heartbeats, keep-alives and long-tail events.
4. **Churn**: at the end of the day a workspace churns with hazard
   ``churn_base * exp(-churn_slope * areas adopted by its members)`` and a
   ``workspace_churned`` event is emitted; its users stop.

Forced adoptions (recommendation-induced first uses from :mod:`.online`'s exposures) enter
at step 2 with a given time. Every random draw comes from a generator seeded by
``(seed, chunk, day)``, so a day's events do not depend on how earlier days were consumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurerec.simulate.catalog import CORE_FEATURES, N_GROUPS, PLANS, Catalog
from featurerec.simulate.ids import mix64, seed_salt
from featurerec.simulate.params import WorldParams
from featurerec.simulate.population import Population

NEVER = np.int32(2**30)
DAY_US = 86_400_000_000
S_US = 1_000_000


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class EventCodes:
    """Integer codes of event types and property strings (shared with the emitter)."""

    types: tuple[str, ...]
    type_index: dict[str, int]
    #: per group: codes of its action events
    group_actions: list[np.ndarray]
    tail_codes: np.ndarray
    tail_probs: np.ndarray


@dataclass
class DayEvents:
    """One chunk-day of events as parallel numpy columns (``-1`` / ``0`` / NaN = null)."""

    day: int
    user: np.ndarray  # local user index (int32)
    etype: np.ndarray  # event type code
    ts: np.ndarray  # int64 microseconds since world start
    item: np.ndarray  # item index or -1
    action: np.ndarray  # index into the item's actions or -1
    context: np.ndarray  # index into the group's contexts or -1
    session: np.ndarray  # day-session index or -1
    seq: np.ndarray  # 1-based position among the session's feature_used, 0 = null
    top: np.ndarray  # time_on_page_seconds, NaN = null
    first: np.ndarray  # is_first_use: 1 / 0 / -1 null
    prop: np.ndarray  # property-string code or -1
    traits: np.ndarray  # bool: carries user_traits
    n_sessions: int = 0
    adoptions: np.ndarray = field(default_factory=lambda: np.empty((0, 3), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class Forced:
    """Recommendation-induced first uses for one day: local user, item, time (us since start)."""

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray


def _sample_rows(w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Row-wise categorical draw from non-negative weights (rows with zero total -> 0)."""
    c = np.cumsum(w, axis=1)
    target = r * c[:, -1]
    idx = (c <= target[:, None]).sum(axis=1)
    return np.minimum(idx, w.shape[1] - 1)


def _segment_arange(counts: np.ndarray) -> np.ndarray:
    """[0..c0-1, 0..c1-1, ...] for counts c."""
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total) - starts


class ChunkSim:
    """The mutable state of one chunk of workspaces, and the day step."""

    def __init__(
        self,
        pop: Population,
        params: WorldParams,
        seed: int,
        chunk: int,
        bounds: tuple[int, int, int, int],
        codes: EventCodes,
        weekday0: int = 0,
    ) -> None:
        self.p = params
        self.weekday0 = weekday0
        self.seed = seed
        self.chunk = chunk
        self.u0, self.u1, self.w0, self.w1 = bounds
        self.codes = codes
        self.cat: Catalog = pop.catalog
        n = self.u1 - self.u0
        k = self.cat.n
        g = self.cat.group
        sl = slice(self.u0, self.u1)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 1, chunk])))

        self.user_ws = pop.user_ws[sl] - self.w0
        self.role = pop.user_role[sl]
        plan = pop.ws_plan[pop.user_ws[sl]]
        size = pop.ws_size[pop.user_ws[sl]]
        ind = pop.ws_industry[pop.user_ws[sl]]
        self.signup = pop.user_signup_day[sl].astype(np.int64)
        self.engagement = pop.user_engagement[sl]
        self.checklist = pop.user_checklist[sl]

        # hidden utility (float32, n x K)
        util = (
            pop.item_base[None, :]
            + pop.item_role[self.role]
            + pop.item_plan[plan]
            + pop.item_size[size]
            + pop.item_industry[ind]
            + pop.user_z[sl] @ pop.item_v.T
            + rng.normal(0.0, params.noise_scale, (n, k))
        )
        self.utility = util.astype(np.float32)

        # eligibility: plan availability and flag rollout bucket hash(seed, user, area) % 100
        salt = seed_salt(seed, 7)
        keys = (np.arange(self.u0, self.u1, dtype=np.uint64)[:, None] << np.uint64(8)) | (
            np.arange(N_GROUPS, dtype=np.uint64)[None, :]
        )
        bucket = (mix64(keys ^ salt) % np.uint64(100)).astype(np.float64)
        rollout = np.array([f.rollout_percentage for f in CORE_FEATURES])
        in_rollout = bucket < rollout[None, :]
        self.eligible = in_rollout[:, g] & self.cat.plans_mask[:, plan].T

        self.discover = pop.item_discover
        self.boost = params.boost_matrix()
        self.trans = params.transition_matrix()
        self.onehot = np.zeros((k, N_GROUPS), dtype=np.float32)
        self.onehot[np.arange(k), g] = 1.0
        self.usage_w = np.exp(params.usage_gamma * self.utility).astype(np.float32)
        self.keep_p = sigmoid(params.keep_slope * (self.utility - params.keep_offset))

        # activity
        e = self.engagement
        act = params.activity_scale
        # activity_scale spreads over how often, how many sessions and how long (cube roots)
        self.p_active = np.minimum(params.active_base * e * act ** (1 / 3), params.active_max)
        # how long people stay saturates: nobody works 40 sessions a day
        e_cap = np.minimum(e, params.engagement_cap)
        self.sess_extra = params.sessions_extra_mean * np.sqrt(e_cap) * act ** (1 / 3)
        self.sess_len = (
            params.session_features_mean * e_cap**params.session_len_elasticity * act ** (1 / 3)
        )

        # workspaces
        nw = self.w1 - self.w0
        self.ws_churn = np.full(nw, NEVER, dtype=np.int64)
        self.ws_churn_ts = np.full(nw, -1, dtype=np.int64)  # us since world start
        self.ws_created = pop.ws_created_day[self.w0 : self.w1].astype(np.int64)
        self.ws_owner = (pop.ws_first_user[self.w0 : self.w1] - self.u0).astype(np.int64)
        self.ws_start = self.ws_owner.copy()

        # adoption state
        self.adopted = np.zeros((n, k), dtype=bool)
        self.kept = np.zeros((n, k), dtype=bool)
        self.adopt_day = np.full((n, k), NEVER, dtype=np.int32)
        self._init_prior_adoption(rng)

    # ------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.u1 - self.u0

    def _hazard(self, rows: np.ndarray, age: np.ndarray, adopted_groups: np.ndarray) -> np.ndarray:
        """Daily first-use hazard (len(rows) x K) before masking by eligibility/adoption."""
        p = self.p
        g = self.cat.group
        boost = 1.0 + (adopted_groups.astype(np.float64) @ self.boost)[:, g]
        onboard_gain = p.onboarding_boost * np.where(self.checklist[rows], p.checklist_effect, 1.0)
        onboard = 1.0 + onboard_gain * np.exp(-np.maximum(age, 0) / p.onboarding_days)
        h = (
            self.discover[None, :]
            * sigmoid(self.utility[rows] - p.discover_offset)
            * boost
            * onboard[:, None]
        )
        if not self.cat.is_core.all():
            # sub-features are found mostly by people who already use their area
            parent_used = adopted_groups[:, g]
            h *= np.where(self.cat.is_core[None, :], 1.0, np.where(parent_used, 1.0, 0.1))
        return h

    def _groups_of(self, mask: np.ndarray) -> np.ndarray:
        """(rows, G) bool: any item of the area in ``mask``."""
        return (mask.astype(np.float32) @ self.onehot) > 0

    def _init_prior_adoption(self, rng: np.random.Generator) -> None:
        """State on day 0 of users who signed up earlier: the same hazard integrated over
        their tenure (two passes, so areas adopted in pass 1 boost pass 2)."""
        p = self.p
        rows = np.nonzero(self.signup < 0)[0]
        if len(rows) == 0:
            return
        tenure = np.minimum(-self.signup[rows], 365).astype(np.float64)
        active_days = self.p_active[rows] * (tenure + p.onboarding_boost * p.onboarding_days)
        none = np.zeros((len(rows), N_GROUPS), dtype=bool)
        elig = self.eligible[rows]
        # age large: no onboarding boost inside _hazard (it is in active_days instead)
        big_age = np.full(len(rows), 10_000)
        h1 = self._hazard(rows, big_age, none)
        p1 = 1.0 - np.exp(-h1 * active_days[:, None])
        a1 = elig & (rng.random(h1.shape) < p1)
        h2 = self._hazard(rows, big_age, self._groups_of(a1))
        p2 = 1.0 - np.exp(-h2 * active_days[:, None])
        extra = (p2 - p1) / np.maximum(1.0 - p1, 1e-9)
        a2 = elig & ~a1 & (rng.random(h1.shape) < extra)
        adopted = a1 | a2
        day = -1 - np.floor(rng.random(adopted.shape) * tenure[:, None]).astype(np.int64)
        self.adopted[rows] = adopted
        self.kept[rows] = adopted & (rng.random(adopted.shape) < self.keep_p[rows])
        self.adopt_day[rows] = np.where(adopted, day, NEVER)

    # ------------------------------------------------------------------------------------
    def step_day(self, day: int, forced: Forced | None = None) -> DayEvents:
        """Simulate one day (see module docstring) and return its events."""
        p = self.p
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.seed, 2, self.chunk, day]))
        )
        cat = self.cat
        g_of = cat.group
        k = cat.n
        day_us = np.int64(day) * DAY_US

        alive = (self.signup <= day) & (self.ws_churn[self.user_ws] >= day)
        age = day - self.signup
        weekday = (day + self.weekday0) % 7
        wk = p.weekend_factor if weekday >= 5 else 1.0
        new_boost = 1.0 + p.new_user_activity_boost * np.exp(-np.maximum(age, 0) / 7.0)
        p_act = np.minimum(self.p_active * wk * new_boost, p.active_max)
        p_act = np.where(age == 0, 1.0, p_act)
        active = alive & (rng.random(self.n) < p_act)
        act = np.nonzero(active)[0]
        n_a = len(act)

        # --- sessions ---------------------------------------------------------------------
        n_sess = 1 + rng.poisson(self.sess_extra[act])
        sess_a = np.repeat(np.arange(n_a), n_sess)
        first_sess = np.cumsum(n_sess) - n_sess
        s_count = len(sess_a)
        mode = rng.random(s_count)
        start_h = np.where(
            mode < 0.4,
            rng.normal(10.5, 1.8, s_count),
            np.where(mode < 0.75, rng.normal(15.0, 2.0, s_count), rng.random(s_count) * 24),
        )
        start = (np.clip(start_h, 0.0, 22.5) * 3600 * S_US).astype(np.int64)
        # each user's sessions in time order
        order = np.lexsort((start, sess_a))
        start = start[order]
        L = rng.poisson(self.sess_len[act][sess_a])

        # --- organic adoption -------------------------------------------------------------
        adopted_a = self.adopted[act]
        groups_a = self._groups_of(adopted_a)
        h = self._hazard(act, age[act], groups_a)
        cand = self.eligible[act] & ~adopted_a
        new = cand & (rng.random((n_a, k)) < -np.expm1(-h))
        na_rows, na_items = np.nonzero(new)
        na_sess = first_sess[na_rows] + np.floor(rng.random(len(na_rows)) * n_sess[na_rows]).astype(
            np.int64
        )
        na_pos = rng.random(len(na_rows)) * (L[na_sess] + 1) - 0.5

        # --- forced (recommendation-induced) adoptions: own short sessions ---------------
        f_users = np.empty(0, dtype=np.int64)
        f_items = np.empty(0, dtype=np.int64)
        f_start = np.empty(0, dtype=np.int64)
        if forced is not None and len(forced.user):
            fu = np.asarray(forced.user, dtype=np.int64)
            fi = np.asarray(forced.item, dtype=np.int64)
            ft = np.asarray(forced.ts, dtype=np.int64) - day_us
            ok = alive[fu] & ~self.adopted[fu, fi] & self.eligible[fu, fi]
            # organic adoption of the same pair today: the earlier of the two wins -> keep organic
            if len(na_rows):
                ok &= ~np.isin(fu * k + fi, act[na_rows].astype(np.int64) * k + na_items)
            # one forced first use per pair
            pair = fu * k + fi
            _, first_idx = np.unique(pair, return_index=True)
            once = np.zeros(len(fu), dtype=bool)
            once[first_idx] = True
            ok &= once
            f_users, f_items, f_start = fu[ok], fi[ok], np.clip(ft[ok], 0, DAY_US - 1)

        n_f = len(f_users)
        # session tables: regular then forced
        sess_user = np.concatenate([act[sess_a], f_users])  # local user index
        sess_start = np.concatenate([start, f_start])
        L_all = np.concatenate([L, np.zeros(n_f, dtype=np.int64)])
        n_sessions = len(sess_user)

        # apply adoptions to the state (chain today only uses items kept before today)
        ad_user = np.concatenate([act[na_rows], f_users])
        ad_item = np.concatenate([na_items, f_items])
        ad_sess = np.concatenate([na_sess, s_count + np.arange(n_f)])
        ad_pos = np.concatenate([na_pos, np.full(n_f, -0.5)])
        self.adopted[ad_user, ad_item] = True
        self.adopt_day[ad_user, ad_item] = day
        self.kept[ad_user, ad_item] = rng.random(len(ad_user)) < self.keep_p[ad_user, ad_item]

        # --- within-session chain over feature areas -------------------------------------
        avail = self.kept[act] & (self.adopt_day[act] < day)
        w_item = np.where(avail, self.usage_w[act], 0.0).astype(np.float32)
        omega = w_item @ self.onehot if k > N_GROUPS else w_item
        has_any = omega.sum(axis=1) > 0
        L_all[:s_count] = np.where(has_any[sess_a], L_all[:s_count], 0)
        ch_sess_l: list[np.ndarray] = []
        ch_pos_l: list[np.ndarray] = []
        ch_grp_l: list[np.ndarray] = []
        cur = np.zeros(s_count, dtype=np.int64)
        max_l = int(L_all[:s_count].max()) if s_count else 0
        for step in range(max_l):
            live = np.nonzero(L_all[:s_count] > step)[0]
            w = omega[sess_a[live]]
            if step > 0:
                w = w * self.trans[cur[live]]
            grp = _sample_rows(w, rng.random(len(live)))
            cur[live] = grp
            ch_sess_l.append(live)
            ch_pos_l.append(np.full(len(live), step, dtype=np.float64))
            ch_grp_l.append(grp)
        ch_sess = np.concatenate(ch_sess_l) if ch_sess_l else np.empty(0, dtype=np.int64)
        ch_pos = np.concatenate(ch_pos_l) if ch_pos_l else np.empty(0)
        ch_grp = np.concatenate(ch_grp_l) if ch_grp_l else np.empty(0, dtype=np.int64)
        if k > N_GROUPS:
            ch_item = self._pick_items(w_item, sess_a[ch_sess], ch_grp, rng)
        else:
            ch_item = ch_grp

        # --- feature_used events: chain + first uses, ordered within sessions ------------
        fe_sess = np.concatenate([ch_sess, ad_sess]).astype(np.int64)
        fe_pos = np.concatenate([ch_pos, ad_pos])
        fe_item = np.concatenate([ch_item, ad_item]).astype(np.int64)
        fe_first = np.concatenate([np.zeros(len(ch_item), np.int8), np.ones(len(ad_item), np.int8)])
        o = np.lexsort((fe_pos, fe_sess))
        fe_sess, fe_item, fe_first = fe_sess[o], fe_item[o], fe_first[o]
        n_fe = len(fe_sess)
        fe_grp = g_of[fe_item]
        seg_counts = np.bincount(fe_sess, minlength=n_sessions)
        seq = (_segment_arange(seg_counts) + 1).astype(np.int32)
        mean_s = np.array([f.mean_seconds for f in CORE_FEATURES])[fe_grp]
        top = np.round(rng.lognormal(np.log(mean_s) - 0.32, 0.8), 1)
        top = np.maximum(top, 1.0)
        step_us = ((top + rng.uniform(1.0, 8.0, n_fe)) * S_US).astype(np.int64)
        cs = np.cumsum(step_us)
        seg_start = np.cumsum(seg_counts) - seg_counts
        excl = cs - step_us
        excl -= np.repeat(excl[seg_start[seg_counts > 0]], seg_counts[seg_counts > 0])
        fe_ts = sess_start[fe_sess] + excl
        # session duration
        sess_dur = np.bincount(fe_sess, weights=step_us, minlength=n_sessions).astype(np.int64)
        sess_dur = np.maximum(sess_dur, (rng.exponential(90.0, n_sessions) * S_US).astype(np.int64))
        sess_dur += 20 * S_US
        fe_user = sess_user[fe_sess]
        n_act = np.array([len(CORE_FEATURES[gg].actions) for gg in range(N_GROUPS)])
        n_ctx = np.array([len(CORE_FEATURES[gg].contexts) for gg in range(N_GROUPS)])
        fe_action = np.where(
            cat.is_core[fe_item], np.floor(rng.random(n_fe) * n_act[fe_grp]), 0
        ).astype(np.int32)
        fe_ctx = np.floor(rng.random(n_fe) * n_ctx[fe_grp]).astype(np.int32)

        parts: list[dict[str, np.ndarray]] = []
        ti = self.codes.type_index
        parts.append(
            dict(
                user=fe_user.astype(np.int32),
                etype=np.full(n_fe, ti["feature_used"], dtype=np.int16),
                ts=fe_ts,
                item=fe_item.astype(np.int32),
                action=fe_action,
                context=fe_ctx,
                session=fe_sess.astype(np.int32),
                seq=seq,
                top=top,
                first=fe_first,
                prop=np.full(n_fe, -1, dtype=np.int32),
                traits=np.ones(n_fe, bool),
            )
        )
        # page views around uses, and one landing view per session
        pv = rng.random(n_fe) < p.page_view_prob
        parts.append(
            self._simple(
                fe_user[pv],
                ti["page_viewed"],
                fe_ts[pv] - S_US,
                fe_sess[pv],
                prop=1 + fe_grp[pv],
            )
        )
        parts.append(
            self._simple(
                sess_user, ti["page_viewed"], sess_start - 2 * S_US, np.arange(n_sessions), prop=0
            )
        )
        # product action events (task_created, board_created, ...)
        ae = rng.random(n_fe) < p.action_event_prob
        ga = self.codes.group_actions
        n_ga = np.array([len(a) for a in ga])
        off = np.cumsum(n_ga) - n_ga
        flat = np.concatenate(ga)
        pick = off[fe_grp[ae]] + np.floor(rng.random(int(ae.sum())) * n_ga[fe_grp[ae]]).astype(int)
        parts.append(
            self._simple(
                fe_user[ae],
                flat[pick],
                fe_ts[ae] + (top[ae] * S_US / 2).astype(np.int64),
                fe_sess[ae],
            )
        )
        # feature_discovered: with every first use, plus some browsing without adoption
        fu_mask = fe_first == 1
        parts.append(
            self._simple(
                fe_user[fu_mask],
                ti["feature_discovered"],
                fe_ts[fu_mask] - S_US // 2,
                fe_sess[fu_mask],
                item=fe_item[fu_mask],
            )
        )
        browse = np.nonzero(rng.random(n_a) < p.browse_discovered_prob)[0]
        if len(browse):
            cand_b = self.eligible[act[browse]] & ~self.adopted[act[browse]]
            wb = np.where(cand_b, sigmoid(self.utility[act[browse]]), 0.0)
            okb = wb.sum(axis=1) > 0
            browse, wb = browse[okb], wb[okb]
            it = _sample_rows(wb, rng.random(len(browse)))
            bs = first_sess[browse]
            parts.append(
                self._simple(
                    act[browse],
                    ti["feature_discovered"],
                    sess_start[bs] + (rng.random(len(bs)) * sess_dur[bs]).astype(np.int64),
                    bs,
                    item=it,
                )
            )
        # heartbeats and keep-alives (noise that ingestion drops)
        for name, every in (
            ("heartbeat", p.heartbeat_every_s),
            ("session_keepalive", p.keepalive_every_s),
        ):
            cnt = (sess_dur // int(every * S_US)).astype(np.int64)
            sidx = np.repeat(np.arange(n_sessions), cnt)
            tt = sess_start[sidx] + (_segment_arange(cnt) + 1) * int(every * S_US)
            parts.append(self._simple(sess_user[sidx], ti[name], tt, sidx, traits=False))
        # long tail of product events
        tail_n = rng.poisson(p.tail_events_per_session * p.activity_scale ** (1 / 3), n_sessions)
        sidx = np.repeat(np.arange(n_sessions), tail_n)
        tcode = rng.choice(self.codes.tail_codes, size=len(sidx), p=self.codes.tail_probs)
        tt = sess_start[sidx] + (rng.random(len(sidx)) * sess_dur[sidx]).astype(np.int64)
        parts.append(self._simple(sess_user[sidx], tcode, tt, sidx))
        # signups
        su = np.nonzero(active & (age == 0))[0]
        if len(su):
            fs = first_sess[np.searchsorted(act, su)]
            parts.append(
                self._simple(su, ti["user_signed_up"], sess_start[fs] - 60 * S_US, fs, prop=13)
            )

        # --- churn at the end of the day ---------------------------------------------------
        parts.append(self._churn(day, rng))

        # one concatenation per column; rows are grouped by kind, not sorted by time
        # (order inside a session is given by timestamp and session_sequence)
        ev = {key: np.concatenate([pt[key] for pt in parts]) for key in parts[0]}
        ev["ts"] = np.clip(ev["ts"], 0, DAY_US - 1) + day_us
        adoptions = np.stack(
            [ad_user.astype(np.int64), ad_item.astype(np.int64), np.full(len(ad_user), day)],
            axis=1,
        )
        return DayEvents(
            day=day,
            user=ev["user"].astype(np.int32, copy=False),
            etype=ev["etype"].astype(np.int16, copy=False),
            ts=ev["ts"],
            item=ev["item"].astype(np.int32, copy=False),
            action=ev["action"].astype(np.int32, copy=False),
            context=ev["context"].astype(np.int32, copy=False),
            session=ev["session"].astype(np.int32, copy=False),
            seq=ev["seq"].astype(np.int32, copy=False),
            top=ev["top"],
            first=ev["first"].astype(np.int8, copy=False),
            prop=ev["prop"].astype(np.int32, copy=False),
            traits=ev["traits"],
            n_sessions=n_sessions,
            adoptions=adoptions,
        )

    @staticmethod
    def _simple(
        user: np.ndarray,
        etype: int | np.ndarray,
        ts: np.ndarray,
        session: np.ndarray,
        *,
        prop: int | np.ndarray = -1,
        item: np.ndarray | None = None,
        traits: bool = True,
    ) -> dict[str, np.ndarray]:
        m = len(user)
        return dict(
            user=np.asarray(user, dtype=np.int32),
            etype=np.broadcast_to(np.asarray(etype, dtype=np.int16), (m,)).copy(),
            ts=np.asarray(ts, dtype=np.int64),
            item=np.full(m, -1, np.int32) if item is None else np.asarray(item, dtype=np.int32),
            action=np.full(m, -1, np.int32),
            context=np.full(m, -1, np.int32),
            session=np.asarray(session, dtype=np.int32),
            seq=np.zeros(m, dtype=np.int32),
            top=np.full(m, np.nan),
            first=np.full(m, -1, dtype=np.int8),
            prop=np.broadcast_to(np.asarray(prop, dtype=np.int32), (m,)).copy(),
            traits=np.full(m, traits),
        )

    def _pick_items(
        self, w_item: np.ndarray, rows: np.ndarray, grp: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """For each (active-row, area) pick an item of that area by usage weight."""
        g_of = self.cat.group
        pr, pi = np.nonzero(w_item > 0)
        key = pr.astype(np.int64) * N_GROUPS + g_of[pi]
        o = np.argsort(key, kind="stable")
        key, pi = key[o], pi[o]
        cw = np.concatenate([[0.0], np.cumsum(w_item[pr[o], pi], dtype=np.float64)])
        ek = rows.astype(np.int64) * N_GROUPS + grp
        lo = np.searchsorted(key, ek, "left")
        hi = np.searchsorted(key, ek, "right")
        target = cw[lo] + rng.random(len(ek)) * (cw[hi] - cw[lo])
        idx = np.searchsorted(cw, target, "right") - 1
        idx = np.clip(idx, lo, np.maximum(hi - 1, lo))
        return pi[np.minimum(idx, len(pi) - 1)]

    def ws_feature_counts(self) -> np.ndarray:
        """Areas adopted (and kept) by any member of each workspace in the chunk."""
        groups = self._groups_of(self.kept)
        nw = self.w1 - self.w0
        out = np.zeros((nw, N_GROUPS), dtype=bool)
        np.logical_or.at(out, self.user_ws, groups)
        return out.sum(axis=1)

    def _churn(self, day: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        p = self.p
        exists = (self.ws_created <= day) & (self.ws_churn == NEVER)
        n_feat = self.ws_feature_counts()
        h = p.churn_base * np.exp(-p.churn_slope * n_feat)
        churn = exists & (rng.random(len(exists)) < -np.expm1(-h))
        w = np.nonzero(churn)[0]
        self.ws_churn[w] = day
        ts = ((20 + rng.random(len(w)) * 3.9) * 3600 * S_US).astype(np.int64)
        self.ws_churn_ts[w] = ts + np.int64(day) * DAY_US
        return self._simple(
            self.ws_owner[w],
            self.codes.type_index["workspace_churned"],
            ts,
            np.full(len(w), -1),
            prop=14,
        )

    # ------------------------------------------------------------------------------------
    def tickets(self, days: int, rng_seed: int) -> dict[str, np.ndarray]:
        """Support tickets: users write about features they tried and dropped (often) or keep
        using (rarely), a few days after first use; plus feature-less tickets (billing, login)."""
        p = self.p
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([rng_seed, 3, self.chunk]))
        )
        in_window = self.adopted & (self.adopt_day >= 0) & (self.adopt_day < days)
        rows, items = np.nonzero(in_window)
        prob = np.where(self.kept[rows, items], p.ticket_kept_prob, p.ticket_dropped_prob)
        # struggling is likelier with low utility
        prob = prob * (1.5 - sigmoid(self.utility[rows, items]))
        t = rng.random(len(rows)) < prob
        rows, items = rows[t], items[t]
        when = (
            self.adopt_day[rows, items] * float(DAY_US) + rng.exponential(2.0, len(rows)) * DAY_US
        )
        # generic tickets
        n_other = rng.poisson(p.ticket_other_rate * self.n * days)
        orow = rng.integers(0, self.n, n_other)
        owhen = (np.maximum(self.signup[orow], 0) + rng.random(n_other) * days) * float(DAY_US)
        users = np.concatenate([rows, orow])
        item = np.concatenate([items, np.full(n_other, -1)])
        ts = np.concatenate([when, owhen]).astype(np.int64)
        keep = (ts < days * DAY_US) & (ts >= np.maximum(self.signup[users], 0) * DAY_US)
        return dict(user=users[keep], item=item[keep], ts=ts[keep], r=rng.random(int(keep.sum())))

    # ------------------------------------------------------------------------------------
    STATE_FIELDS = ("adopted", "kept", "adopt_day", "ws_churn", "ws_churn_ts")

    def save_state(self, path: Path) -> None:
        np.savez_compressed(path, **{f: getattr(self, f) for f in self.STATE_FIELDS})

    def load_state(self, path: Path) -> None:
        with np.load(path) as z:
            for f in self.STATE_FIELDS:
                setattr(self, f, z[f].copy())


def plan_names() -> tuple[str, ...]:
    return PLANS
