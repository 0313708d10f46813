"""Off-policy evaluation of a candidate model on a deployment's own recommendation log.

Serving writes, next to every served request's recommendations (``ml.recommendation_log``,
with the logging policy's propensity of each item), the decision it made them on
(``ml.recommendation_context``: the user state the model scored and the features the
eligibility rules left; :func:`featurerec.serving.service.decision_context`). This module
reads both back with the rounds' rewards (:mod:`featurerec.experiments.rounds`), replays a
candidate model on each logged decision, and estimates the candidate's CTR and 7-day
adoption per recommendation with :mod:`featurerec.experiments.ope`'s estimators::

    decisions = load_logged_decisions(engine, model.features, as_of=..., start=..., end=...)
    dist_fn = lambda req, exclude: target_slate_dist(
        model, "hybrid", [decisions.users[i] for i in req], exclude, k, top_k, eps)
    results = evaluate(decisions, dist_fn, k=k)   # one CandidateEstimate per metric
    own = evaluate(decisions, dist_fn, k=k, self_exposure=SelfExposure(rules, eps, history))

The candidate is replayed with the serving path's own candidate and slate logic
(:func:`featurerec.models.ranking.slate_distribution`), so when the candidate *is* the
logging policy every importance weight is 1 and the estimate equals the logged rate
(``tests/test_experiment_ope_cli.py`` checks this end to end).

On the log's eligibility (the default of :func:`evaluate`), the estimate is one-step: the
candidate's value on the logged users *as they were*, with the caps and cooldowns the
*logging* policy's showings put on them. A policy that runs for weeks meets its own caps and
cooldowns instead; :class:`SelfExposure` replays the candidate with its own exposure
(``featurerec experiment ope``'s default), and the simulated online experiment
(``featurerec simulate experiment``) measures both against the online result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import orjson

from featurerec.errors import DataError, ModelError
from featurerec.experiments import stats as st
from featurerec.experiments.ope import (
    OPEEstimate,
    StratumEstimate,
    estimate_from_weights,
    stratified_snips,
    tabular_reward_model,
)
from featurerec.experiments.rounds import (
    METRICS,
    Rounds,
    load_rounds,
    online_rate,
    showing_stratum,
)
from featurerec.models.base import UserContext, UserState
from featurerec.models.ranking import sample_slates, slate_distribution
from featurerec.serving.eligibility import EligibilityRules, Exposure, exposure_exclude
from featurerec.serving.state import epoch_seconds

#: Reward-model (DR) context: the user's event count in buckets of 5, capped at 60.
EVENT_BUCKET, EVENT_CAP = 5, 60


@dataclass(frozen=True)
class LoggedDecisions:
    """The logged rounds that have a decision context, in a candidate's item space.

    Per round: ``rounds`` (rewards, user, time, showing), ``request`` (index into the
    per-request arrays), ``action`` (item index in ``features``; ``len(features)`` for an
    item the candidate does not know, which it shows with probability 0), ``position``
    (0-based slot) and ``pscore`` (the logging policy's propensity). Per request: ``users``
    (the state the logging model scored) and the eligibility, kept as the logged list
    (``listed``: item indices; ``listed_eligible``: whether they are the eligible or the
    excluded ones), since a dense (requests x items) mask does not fit in memory at 10,000
    features; :meth:`exclude_rows` builds the mask for a chunk of requests. A
    decision logged with its ``eligible`` list makes every other feature ineligible; one
    logged with its ``excluded`` list makes every other feature eligible, including features
    serving did not know then (the candidate's mass on those shows up as
    :attr:`CandidateEstimate.unlogged_mass`). ``missing_context`` counts rounds dropped
    because their request has no context row (logs written before contexts were logged);
    ``unknown_action`` counts the rounds showing an item the candidate does not know (kept:
    dropping them would inflate IPS)."""

    rounds: Rounds
    request: np.ndarray
    action: np.ndarray
    position: np.ndarray
    pscore: np.ndarray
    users: list[UserState]
    listed: list[np.ndarray]
    listed_eligible: np.ndarray
    features: list[str]
    missing_context: int = 0
    unknown_action: int = 0
    #: Per request: when it was served (epoch seconds) and the items only the exposure
    #: rules (dismissal cooldown, weekly cap, weekly diversity) excluded then, None for a
    #: decision logged before serving wrote them (:class:`SelfExposure` needs them)
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))
    exposure_listed: list[np.ndarray | None] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.rounds.n

    def exclude_rows(self, requests: np.ndarray) -> np.ndarray:
        """(len(requests), n_items) eligibility mask, True = not eligible then."""
        out = np.empty((len(requests), len(self.features)), dtype=bool)
        for row, q in enumerate(np.asarray(requests).tolist()):
            eligible_listed = bool(self.listed_eligible[q])
            out[row] = eligible_listed
            out[row, self.listed[q]] = not eligible_listed
        return out

    @property
    def slate_size(self) -> int:
        return int(self.position.max()) + 1 if self.position.size else 0


def _names(value: str | None) -> list[str]:
    return [] if value is None else list(orjson.loads(value))


def _indices(value: str, findex: dict[str, int]) -> np.ndarray:
    """A JSON list of feature names as item indices (names the item space lacks dropped)."""
    return np.array([findex[f] for f in _names(value) if f in findex], dtype=np.int64)


def _user(row: dict[str, Any]) -> UserState:
    ctx = orjson.loads(row["user_context"]) if row["user_context"] else {}
    known = UserContext.__dataclass_fields__
    return UserState(
        row["user_id"],
        UserContext(**{k: v for k, v in ctx.items() if k in known}),
        {str(k): float(v) for k, v in orjson.loads(row["interactions"] or "{}").items()},
        tuple(_names(row["recent_features"])),
        int(row["event_count"] or 0),
    )


def load_logged_decisions(
    engine: Any,
    features: list[str],
    *,
    as_of: datetime,
    start: datetime | None = None,
    end: datetime | None = None,
    experiments: bool = True,
    include_random: bool = True,
) -> LoggedDecisions:
    """The rounds served in [``start``, ``end``] (by ``as_of``) with their logged action,
    slot, propensity and decision context, mapped onto ``features`` (a candidate model's
    item order). Every served round is a valid log, whoever served it: its propensity is
    the probability under the policy that served that user (an experiment's variant, a
    random holdout, production). With ``experiments=False`` only the rounds served outside
    experiments count, and with ``include_random=False`` not those of the random strategy
    either (:func:`load_rounds`, ``logging=True``). Run attribution as of ``as_of`` first.
    :class:`DataError` when a logged propensity is not in (0, 1]."""
    rounds = load_rounds(
        engine, as_of=as_of, start=start, end=end, logging=not experiments,
        include_random=include_random,
    )  # fmt: skip
    none = np.zeros(0, dtype=np.int64)
    empty = LoggedDecisions(
        rounds.subset(np.zeros(rounds.n, dtype=bool)),
        none,
        none,
        none,
        np.zeros(0),
        [],
        [],
        np.zeros(0, dtype=bool),
        list(features),
    )
    if not rounds.n:
        return empty
    import pyarrow as pa

    engine.register_arrow(
        "_ope_rounds", pa.table({"recommendation_id": rounds.recommendation_id.tolist()})
    )
    try:
        logged = engine.query_rows(
            "SELECT l.recommendation_id, l.request_id, l.recommended_feature, l.position, "
            "l.propensity FROM ml.recommendation_log l "
            "JOIN _ope_rounds r USING (recommendation_id)"
        )
        contexts = engine.query_rows(
            "SELECT c.* FROM ml.recommendation_context c WHERE c.request_id IN ("
            "SELECT l.request_id FROM ml.recommendation_log l "
            "JOIN _ope_rounds r USING (recommendation_id)) ORDER BY c.generated_at, c.request_id"
        )
    finally:
        engine.unregister("_ope_rounds")
    by_rec = {r["recommendation_id"]: r for r in logged}
    req_index = {c["request_id"]: i for i, c in enumerate(contexts)}
    findex = {f: j for j, f in enumerate(features)}
    keep, request, action, position, pscore = [], [], [], [], []
    missing = unknown = 0
    for i, rid in enumerate(rounds.recommendation_id.tolist()):
        row = by_rec.get(rid)
        q = None if row is None else req_index.get(row["request_id"])
        if row is None or q is None:
            missing += 1
            continue
        j = findex.get(row["recommended_feature"])
        if j is None:
            unknown += 1
            j = len(features)
        p = row["propensity"]
        if p is None or not 0 < float(p) <= 1:
            raise DataError(
                f"ml.recommendation_log: recommendation {rid} has propensity {p!r}; "
                "off-policy evaluation needs the logging policy's probability in (0, 1]"
            )
        keep.append(i)
        request.append(q)
        action.append(j)
        position.append(int(row["position"]) - 1)  # the log's positions are 1-based
        pscore.append(float(p))
    if not keep:
        return replace(empty, missing_context=missing, unknown_action=unknown)
    exposure_listed = [
        None if c.get("exposure_excluded") is None else _indices(c["exposure_excluded"], findex)
        for c in contexts
    ]
    times = np.array([epoch_seconds(c["generated_at"]) for c in contexts], dtype=np.float64)
    # per request, in the candidate's item order: the logged eligible (or excluded) items
    listed_eligible = np.array([c["eligible"] is not None for c in contexts], dtype=bool)
    listed = [
        np.array(
            [findex[f] for f in _names(c["eligible"] if ok else c["excluded"]) if f in findex],
            dtype=np.int64,
        )
        for c, ok in zip(contexts, listed_eligible.tolist(), strict=True)
    ]
    mask = np.zeros(rounds.n, dtype=bool)
    mask[keep] = True
    return LoggedDecisions(
        rounds.subset(mask),
        np.asarray(request, dtype=np.int64),
        np.asarray(action, dtype=np.int64),
        np.asarray(position, dtype=np.int64),
        np.asarray(pscore, dtype=np.float64),
        [_user(c) for c in contexts],
        listed,
        listed_eligible,
        list(features),
        missing,
        unknown,
        times,
        exposure_listed,
    )


@dataclass(frozen=True)
class ExposureHistory:
    """What each user was shown (epoch seconds, item index) and when they last dismissed
    each item, before a log's window: where a replayed candidate's own exposure starts."""

    shows: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    dismissed: dict[str, dict[int, float]] = field(default_factory=dict)


def load_exposure_history(
    engine: Any, features: list[str], *, before: datetime, days: float
) -> ExposureHistory:
    """The recommendations served in the ``days`` before ``before`` (and whether each was
    dismissed: its dismissal is dated at the showing, seconds early) from
    ``ml.recommendation_feedback``, in ``features``' item order. Run attribution first."""
    rows = engine.query_rows(
        "SELECT user_id, recommended_feature, generated_at, dismissed "
        "FROM ml.recommendation_feedback WHERE generated_at >= $start AND generated_at < $end "
        "ORDER BY generated_at, recommendation_id",
        {"start": before - timedelta(days=days), "end": before},
    )
    findex = {f: j for j, f in enumerate(features)}
    out = ExposureHistory()
    for r in rows:
        j = findex.get(r["recommended_feature"])
        if j is None:
            continue
        t = epoch_seconds(r["generated_at"])
        out.shows.setdefault(r["user_id"], []).append((t, j))
        if r["dismissed"]:
            out.dismissed.setdefault(r["user_id"], {})[j] = t
    return out


@dataclass(frozen=True)
class SelfExposure:
    """Replay a candidate with its *own* exposure history instead of the logging policy's.

    Serving's exposure rules (dismissal cooldown, weekly cap, weekly diversity) exclude
    what a policy itself showed, so a policy that keeps its favourite items in front of a
    user soon runs into its own caps and cooldowns and serves further down its ranking; the
    logged eligibility instead reflects what the *logging* policy showed. With this
    setting, :func:`evaluate` walks each user's logged requests in time order, starting from
    the exposure in ``history`` (what was served before the window), and at each request:

    1. the eligibility is the logged one without the logged exposure exclusions
       (``exposure_excluded`` in the decision context), plus the exposure rules (``rules``:
       :func:`featurerec.serving.eligibility.exposure_exclude`, serving's own code) applied
       to the candidate's replayed exposure, plus what the candidate's replay adopted;
    2. the candidate's slate distribution on that eligibility gives the importance weights;
    3. one slate is drawn from it (the epsilon-greedy policy, ``eps``) and becomes the
       candidate's exposure; each drawn item's dismissal and caused adoption (a 7-day
       adoption after a click on it) is the logged outcome when the logging policy showed
       that item in that request, otherwise a draw from the logged rate per (event-count
       bucket, item) (:func:`~featurerec.experiments.ope.tabular_reward_model`). A caused
       adoption excludes the item from the user's later requests. An adoption without a
       click counts as organic: it is in the logged eligibility once it happens, for the
       user it happened to (drawing those too would exclude items at random from users
       who were not going to adopt them, and lower the estimated adoption).

    What it does not model: the user's later requests, interests and organic adoption are the
    logged ones (a candidate that caused an adoption the logging policy did not changes them
    only through the eligibility); adoptions the logging policy caused stay in the logged
    eligibility. The candidate's mass on items the logging policy could not show at a request
    (it had excluded them) has no logged reward there: IPS counts it as 0, DR fills it with
    the reward model (:attr:`CandidateEstimate.unsupported_mass` says how much), scaled for
    an item the user had dismissed before in the log world by the logged ratio on such
    re-showings (:attr:`CandidateEstimate.dismissed_ratio`: a dismissal says the item suits
    that user less than the mean). "Before" reaches back as far as ``history`` does (what
    :func:`load_exposure_history` loaded) plus the window. ``seed`` fixes the draws."""

    rules: EligibilityRules
    eps: float
    history: ExposureHistory = field(default_factory=ExposureHistory)
    seed: int = 0


#: Fewest logged re-showings of a dismissed item to estimate their reward ratio from.
MIN_DISMISSED_ROUNDS = 100


class _Replay:
    """The per-user exposure state of a :class:`SelfExposure` replay (see there)."""

    def __init__(
        self,
        d: LoggedDecisions,
        cfg: SelfExposure,
        k: int,
        ctx_of_request: np.ndarray,
        n_contexts: int,
    ) -> None:
        self.d, self.cfg, self.k = d, cfg, k
        self.ctx = ctx_of_request
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, 7])))
        self.n_items = len(d.features)
        n_actions = self.n_items + 1
        self.shows = {u: list(v) for u, v in cfg.history.shows.items()}
        self.dismissed = {u: dict(v) for u, v in cfg.history.dismissed.items()}
        self.adopted: dict[str, set[int]] = {}
        ctx_r = self.ctx[d.request] if d.n else np.zeros(0, dtype=np.int64)
        dis = d.rounds.dismissed.astype(np.float64)
        self.p_dismiss = tabular_reward_model(
            ctx_r, d.action, dis, n_contexts=n_contexts, n_actions=n_actions
        )
        # the adoptions a showing caused: those after a click on it. One without a click
        # is counted as organic: the logged eligibility excludes it once it happens, for
        # the user it happened to; drawing it again at the logged rate would exclude items
        # at random from users who were not going to adopt them
        adopt, closed = d.rounds.reward("rec_adoption_7d")
        caused = adopt * (d.rounds.clicked > 0)
        self.p_adopt = tabular_reward_model(
            ctx_r[closed], d.action[closed], caused[closed], n_contexts=n_contexts,
            n_actions=n_actions,
        )  # fmt: skip
        # when each user first dismissed each item in the log world (the history before
        # the window, then the window's rounds), and which logged rounds re-showed an item
        # the user had dismissed before
        self.log_dismissals: dict[str, dict[int, float]] = {
            u: dict(v) for u, v in cfg.history.dismissed.items()
        }
        self.dismissed_before = np.zeros(d.n, dtype=bool)
        for i in np.argsort(d.times[d.request], kind="stable").tolist():
            a, q = int(d.action[i]), int(d.request[i])
            if a >= self.n_items:
                continue
            seen = self.log_dismissals.setdefault(d.users[q].user_id, {})
            t = float(d.times[q])
            self.dismissed_before[i] = seen.get(a, np.inf) < t
            if dis[i] and a not in seen:
                seen[a] = t
        # the logged outcome of each item the logging policy showed, per request
        self.logged: dict[int, dict[int, tuple[bool, bool | None]]] = {}
        adopted_known = np.where(closed, caused > 0, False)
        for i in range(d.n):
            a = int(d.action[i])
            if a < self.n_items:
                self.logged.setdefault(int(d.request[i]), {})[a] = (
                    bool(dis[i]),
                    bool(adopted_known[i]) if closed[i] else None,
                )

    def exclude(self, batch: np.ndarray, logged: np.ndarray) -> np.ndarray:
        """The candidate's eligibility at these requests (True = excluded), from the logged
        mask ``logged`` (len(batch), n_items)."""
        d, rules = self.d, self.cfg.rules
        out = np.empty_like(logged)
        for row, q in enumerate(batch.tolist()):
            base = logged[row].copy()
            listed = d.exposure_listed[q] if q < len(d.exposure_listed) else None
            if listed is not None:
                base[listed] = False
            user = d.users[q].user_id
            adopted = self.adopted.get(user)
            if adopted:
                base[list(adopted)] = True
            now = float(d.times[q])
            out[row] = exposure_exclude(rules, base, self._exposure(user, now), now, self.k)[0]
        return out

    def dismissed_ratio(
        self,
        models: dict[str, np.ndarray],
        rewards: dict[str, tuple[np.ndarray, np.ndarray]],
        ctx: np.ndarray,
    ) -> dict[str, float | None]:
        """Per metric: the logged reward on rounds re-showing an item the user had
        dismissed before, over the reward model's (bucket, item) value on them; None below
        MIN_DISMISSED_ROUNDS such rounds."""
        out: dict[str, float | None] = {}
        for m, table in models.items():
            r, closed = rewards[m]
            f = self.dismissed_before & closed
            expected = float(table[ctx[f], self.d.action[f]].sum())
            ok = int(f.sum()) >= MIN_DISMISSED_ROUNDS and expected > 0
            out[m] = float(r[f].sum()) / expected if ok else None
        return out

    def dismissed_mask(self, batch: np.ndarray) -> np.ndarray:
        """(len(batch), n_items): True where the user had dismissed the item in the log
        world before that request."""
        out = np.zeros((len(batch), self.n_items), dtype=bool)
        for row, q in enumerate(batch.tolist()):
            now = float(self.d.times[q])
            seen = self.log_dismissals.get(self.d.users[q].user_id, {})
            out[row, [j for j, t in seen.items() if t < now]] = True
        return out

    def _exposure(self, user: str, now: float) -> Exposure:
        exp = Exposure.empty(self.n_items)
        shows = self.shows.get(user)
        if shows:
            cutoff = now - 7 * 86_400.0
            if shows[0][0] <= cutoff:
                shows[:] = [s for s in shows if s[0] > cutoff]
            for ts, j in shows:
                if ts <= now:
                    exp.shown_7d[j] += 1
        for j, ts in self.dismissed.get(user, {}).items():
            exp.last_dismissed[j] = ts
        return exp

    def advance(self, batch: np.ndarray, dist: np.ndarray) -> None:
        """Draw the candidate's slate at each request of ``batch`` and record it."""
        d = self.d
        slates = sample_slates(dist, self.cfg.eps, self.rng)
        draws = self.rng.random((len(batch), slates.shape[1], 2))
        for row, q in enumerate(batch.tolist()):
            user = d.users[q].user_id
            now = float(d.times[q])
            logged = self.logged.get(q, {})
            c = int(self.ctx[q])
            for slot, j in enumerate(slates[row].tolist()):
                if j < 0:
                    continue
                self.shows.setdefault(user, []).append((now, j))
                dismissed, adopted = logged.get(j, (None, None))
                if dismissed is None:
                    dismissed = bool(draws[row, slot, 0] < self.p_dismiss[c, j])
                if adopted is None:
                    adopted = bool(draws[row, slot, 1] < self.p_adopt[c, j])
                if dismissed:
                    self.dismissed.setdefault(user, {})[j] = now
                if adopted:
                    self.adopted.setdefault(user, set()).add(j)


def _waves(d: LoggedDecisions, step: int) -> Iterator[np.ndarray]:
    """Request batches for a replay: every user's first request, then every user's second,
    ... (each in time order), so a user's requests are replayed in order and at most once
    per batch; batches hold at most ``step`` requests."""
    n = len(d.users)
    _, code = np.unique(np.array([u.user_id for u in d.users], dtype=object), return_inverse=True)
    order = np.lexsort((d.times[:n], code))  # by user, then time
    sc = code[order]
    first = np.r_[0, np.flatnonzero(np.diff(sc)) + 1]  # where each user's run starts
    ordinal = np.arange(n) - first[sc]
    by_wave = order[np.argsort(ordinal, kind="stable")]
    bounds = np.searchsorted(np.sort(ordinal), np.arange(int(ordinal.max(initial=-1)) + 2))
    for w in range(len(bounds) - 1):
        wave = by_wave[bounds[w] : bounds[w + 1]]
        for i in range(0, wave.size, step):
            yield wave[i : i + step]


def target_slate_dist(
    model: Any,
    strategy: str,
    users: list[UserState],
    exclude: np.ndarray,
    k: int,
    top_k: int,
    eps: float,
) -> np.ndarray:
    """(requests, n_items, k): probability that ``strategy`` of ``model`` (a serving
    :class:`~featurerec.serving.loader.BundleModel`) under the exploring slate policy shows
    item i at slot p, for these logged decisions (user states and eligibility), from the
    model's unexcluded ``full_results``. Callers pass one chunk at a time
    (:func:`evaluate` sizes them with :func:`chunk_size`)."""
    upstream, rank, _ = model.full_results(strategy, users)
    return slate_distribution(upstream, rank, exclude, k, top_k, eps)


@dataclass(frozen=True)
class CandidateEstimate:
    """A candidate's value per recommendation for one metric, estimated from the log.

    ``estimates``: IPS, SNIPS and DR, per recommendation the candidate shows; ``logged``:
    the logging policy's own rate on the same rounds (what the log observed), for reference;
    ``empty_mass``: the candidate's mean probability of showing nothing in a logged slot
    (nonzero when it has fewer eligible items than the log did, e.g. under its own caps: those
    slots are not recommendations, so IPS and DR divide by the slots it fills);
    ``unlogged_mass``: its mean probability, per logged slot, of an item the logging policy
    never showed in this log (no support: the estimate cannot see that item's reward);
    ``unsupported_mass``: its mean probability, per logged slot, of an item the logging
    policy could not show at that request (excluded then; only nonzero with
    :class:`SelfExposure`); ``strata``: SNIPS by first / second / later showing of the
    logged item."""

    metric: str
    n: int
    estimates: dict[str, OPEEstimate]
    logged: st.Estimate
    empty_mass: float
    unlogged_mass: float
    strata: dict[str, StratumEstimate]
    unsupported_mass: float = 0.0
    #: With :class:`SelfExposure`: the logged reward on re-showings of an item the user had
    #: dismissed, over DR's reward model on them (it scales the model for such pairs);
    #: None when the log has fewer than MIN_DISMISSED_ROUNDS of them (no adjustment)
    dismissed_ratio: float | None = None


#: A request chunk's slate distribution is (chunk, n_items, k) float64; chunks are sized
#: to keep it under this many cells (~130 MB).
CHUNK_CELLS = 1 << 24


def chunk_size(n_items: int, k: int) -> int:
    """Requests per chunk so that a chunk's (chunk, n_items, k) array stays < CHUNK_CELLS."""
    return max(1, min(4096, CHUNK_CELLS // max(1, n_items * k)))


def evaluate(
    decisions: LoggedDecisions,
    dist_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    metrics: tuple[str, ...] = tuple(METRICS),
    min_rounds: int = 50,
    k: int | None = None,
    self_exposure: SelfExposure | None = None,
) -> dict[str, CandidateEstimate | str]:
    """Per metric: the candidate's :class:`CandidateEstimate`, or a sentence saying why not
    (fewer than ``min_rounds`` rounds whose window has closed). ``dist_fn(requests,
    exclude)`` gives the candidate's slate distribution for those request indices under the
    eligibility ``exclude`` ((len, n_items), True = excluded), (len, n_items, >= k) as
    :func:`target_slate_dist`; it is called chunk by chunk, and only each round's per-slot
    terms are kept (the candidate's probability of the logged item, its expected reward-model
    value, its empty, unlogged and unsupported mass), so memory does not grow with items x
    requests. The eligibility is the logged one, or with ``self_exposure`` the candidate's
    own (:class:`SelfExposure`). Intervals are user-clustered; DR's reward model is the mean
    reward per (event-count bucket, item)."""
    d = decisions
    n_items = len(d.features)
    n_actions = n_items + 1  # the items, then "an item the candidate does not know"
    k = k or max(d.slate_size, 1)
    bucket = np.array([min(u.event_count, EVENT_CAP) // EVENT_BUCKET for u in d.users])
    ctx = bucket[d.request] if d.n else np.zeros(0, dtype=np.int64)
    n_ctx = EVENT_CAP // EVENT_BUCKET + 1
    ever = np.zeros(n_actions, dtype=bool)
    ever[d.action] = True
    unlogged_items = ~ever[:n_items]
    rewards = {m: d.rounds.reward(m) for m in metrics}
    # the reward models (logged data only), one per metric, items + the unknown item
    q = {
        m: tabular_reward_model(ctx[c], d.action[c], r[c], n_contexts=n_ctx, n_actions=n_actions)
        for m, (r, c) in rewards.items()
        if c.any()
    }
    target = np.zeros(d.n)  # the candidate's probability of the logged item at its slot
    slot_mass = np.zeros(d.n)
    unlogged = np.zeros(d.n)
    unsupported = np.zeros(d.n)
    q_expected = {m: np.zeros(d.n) for m in q}
    by_request = np.argsort(d.request, kind="stable")
    bounds = np.searchsorted(d.request[by_request], np.arange(len(d.users) + 1))
    step = chunk_size(n_items, k)
    if self_exposure is not None and len(d.times) != len(d.users):
        raise DataError(
            "replaying with the candidate's own exposure needs each logged request's time "
            "(LoggedDecisions.times, as load_logged_decisions reads them)"
        )
    replay = None if self_exposure is None else _Replay(d, self_exposure, k, bucket, n_ctx)
    batches = (
        _waves(d, step)
        if replay is not None
        else (np.arange(r0, min(r0 + step, len(d.users))) for r0 in range(0, len(d.users), step))
    )
    local = np.zeros(len(d.users), dtype=np.int64)  # request -> row in its batch
    # with the candidate's own exposure, DR's reward model knows whether the user had
    # dismissed the item before (in the log world): a dismissal says the item suits that
    # user less than the (bucket, item) mean, which matters where the candidate shows an
    # item the log's cooldown hid (no logged reward there: the model fills it in)
    dismissed_ratio = (
        {m: None for m in q} if replay is None else replay.dismissed_ratio(q, rewards, ctx)
    )
    ratio = {m: 1.0 if v is None else v for m, v in dismissed_ratio.items()}
    dis_before = np.zeros(d.n, dtype=bool) if replay is None else replay.dismissed_before
    adjust = any(v != 1.0 for v in ratio.values())
    for batch in batches:
        lens = bounds[batch + 1] - bounds[batch]  # the batch's rounds, request by request
        sel = by_request[np.repeat(bounds[batch] - np.cumsum(lens) + lens, lens)
                         + np.arange(int(lens.sum()))]  # fmt: skip
        if not sel.size and replay is None:
            continue
        logged = d.exclude_rows(batch)
        exclude = logged if replay is None else replay.exclude(batch, logged)
        dist = dist_fn(batch, exclude)
        if dist.shape[:2] != (batch.size, n_items) or dist.shape[2] < k:
            raise DataError(
                f"dist_fn must give (requests, items, >= {k}) = ({batch.size}, {n_items}, "
                f"{k}), got {dist.shape}"
            )
        if replay is not None:
            replay.advance(batch, dist)
        if not sel.size:
            continue
        local[batch] = np.arange(batch.size)
        row = local[d.request[sel]]
        at = dist[row, :, d.position[sel]]  # (rounds, items)
        a = d.action[sel]
        known = a < n_items
        target[sel] = np.where(known, at[np.arange(sel.size), np.minimum(a, n_items - 1)], 0.0)
        slot_mass[sel] = at.sum(axis=1)
        unlogged[sel] = at[:, unlogged_items].sum(axis=1)
        unsupported[sel] = np.einsum("ri,ri->r", at, logged[row])
        dmask = replay.dismissed_mask(batch)[row] if replay is not None and adjust else None
        for m, table in q.items():
            tq = table[ctx[sel], :n_items]  # a copy (fancy indexing): scaled in place
            if dmask is not None:
                tq[dmask] *= ratio[m]
            q_expected[m][sel] = np.einsum("ri,ri->r", at, tq)
            del tq  # (rounds, items): freed before the next metric's is built
    if np.any(slot_mass > 1 + 1e-6):
        raise DataError("the candidate's slate distribution puts more than 1 on a slot")
    showing = showing_stratum(d.rounds.showing)
    groups = d.rounds.user_id
    weight = target / d.pscore
    out: dict[str, CandidateEstimate | str] = {}
    for metric, (reward, closed) in rewards.items():
        if int(closed.sum()) < min_rounds:
            out[metric] = (
                f"only {int(closed.sum())} logged rows with complete {metric} windows "
                f"(need {min_rounds})"
            )
            continue
        r, w, g = reward[closed], weight[closed], groups[closed]
        out[metric] = CandidateEstimate(
            metric=metric,
            n=int(closed.sum()),
            estimates=estimate_from_weights(
                r,
                w,
                q_logged=q[metric][ctx[closed], d.action[closed]]
                * np.where(dis_before[closed], ratio[metric], 1.0),
                q_expected=q_expected[metric][closed],
                groups=g,
                shown=np.clip(slot_mass[closed], 0.0, 1.0),
            ),
            logged=online_rate(d.rounds.subset(closed), metric),
            empty_mass=float(np.clip(1.0 - slot_mass[closed], 0.0, 1.0).mean()),
            unlogged_mass=float(unlogged[closed].mean()),
            unsupported_mass=float(unsupported[closed].mean()),
            dismissed_ratio=dismissed_ratio.get(metric),
            strata=stratified_snips(r, w, showing[closed], groups=g),
        )
    return out


@dataclass(frozen=True)
class CandidateReport:
    """``featurerec experiment ope``: a candidate's estimated value on a deployment's log.

    ``candidate``: the model version replayed (its serving name); ``trained_as_of``: the
    candidate's training cut from the registry, when known; ``overlaps_log`` is True when
    that cut is after the log's start: the candidate learned from rounds it is evaluated on,
    which makes the estimate optimistic (evaluate on a log written after its training)."""

    candidate: str
    strategy: str
    since: datetime | None
    until: datetime
    as_of: datetime
    rounds: int
    requests: int
    missing_context: int
    unknown_action: int
    trained_as_of: datetime | None
    overlaps_log: bool
    results: dict[str, CandidateEstimate | str]
    #: "own": replayed with the candidate's own exposure (:class:`SelfExposure`);
    #: "logged": on the log's eligibility (one-step)
    exposure: str = "own"
    #: requests logged without their exposure exclusions (before serving wrote them): an
    #: own-exposure replay keeps the logging policy's exclusions there
    no_exposure_log: int = 0


def evaluate_candidate(
    engine: Any,
    registry: Any,
    deployment: Any,
    *,
    strategy: str,
    as_of: datetime,
    since: datetime | None = None,
    until: datetime | None = None,
    ranker_uri: str | None = None,
    candidate_generator_uri: str | None = None,
    index_uri: str | None = None,
    experiments: bool = True,
    rules: EligibilityRules | None = None,
    seed: int = 0,
) -> CandidateReport:
    """Replay a registered model (the deployment's, with any URI overridden) with
    ``strategy`` on the logged decisions in [``since``, ``until``] and estimate its CTR and
    7-day adoption per recommendation. Serving's slate settings (``output_k``,
    ``candidate_generator.top_k``, ``exploration_rate``) are the deployment's. With
    ``rules`` (serving's exposure rules) the candidate is replayed with its own exposure
    (:class:`SelfExposure`, starting from what the log served in the cooldown before
    ``since``; ``seed`` fixes its draws), without them on the log's eligibility."""
    from featurerec.serving.loader import load_model

    models = deployment.models
    changes: dict[str, Any] = {}
    if ranker_uri:
        changes["ranker"] = models.ranker.model_copy(update={"model_uri": ranker_uri})
    if candidate_generator_uri or index_uri:
        cg = models.candidate_generator
        changes["candidate_generator"] = cg.model_copy(
            update={
                "model_uri": candidate_generator_uri or cg.model_uri,
                "ann_index": index_uri or cg.ann_index,
            }
        )
    if changes:
        deployment = deployment.model_copy(update={"models": models.model_copy(update=changes)})
    model = load_model(registry, deployment)
    name = model.strategy_name(strategy)
    until = until or as_of
    decisions = load_logged_decisions(
        engine, model.features, as_of=as_of, start=since, end=until, experiments=experiments
    )
    if not decisions.n:
        raise DataError(
            f"no logged recommendations to evaluate from between {since or 'the start'} and "
            f"{until}{'' if experiments else ' outside experiments'} with a decision context "
            f"({decisions.missing_context} rounds have none). Load the serving log first "
            "(`featurerec reclog load`, then `featurerec feedback attribute`)"
        )
    dep = deployment.models
    eps = 1.0 if name == "random" else dep.ranker.exploration_rate
    k = max(dep.ranker.output_k, decisions.slate_size)

    def dist_fn(requests: np.ndarray, exclude: np.ndarray) -> np.ndarray:
        users = [decisions.users[i] for i in requests.tolist()]
        return target_slate_dist(model, name, users, exclude, k, dep.candidate_generator.top_k, eps)

    replay = None
    if rules is not None:
        start = since or decisions.rounds.generated_at.min().astype(datetime)
        history = load_exposure_history(
            engine, model.features, before=start, days=max(7, rules.dismissal_cooldown_days)
        )
        replay = SelfExposure(rules, eps, history, seed=seed)
    trained = _trained_as_of(registry, deployment.models.ranker.model_uri)
    return CandidateReport(
        candidate=model.version,
        strategy=name,
        since=since,
        until=until,
        as_of=as_of,
        rounds=decisions.n,
        requests=len(decisions.users),
        missing_context=decisions.missing_context,
        unknown_action=decisions.unknown_action,
        trained_as_of=trained,
        overlaps_log=trained is not None
        and trained > (since or decisions.rounds.generated_at.min().astype(datetime)),
        results=evaluate(decisions, dist_fn, k=k, self_exposure=replay),
        exposure="logged" if replay is None else "own",
        no_exposure_log=sum(x is None for x in decisions.exposure_listed),
    )


def _trained_as_of(registry: Any, uri: str) -> datetime | None:
    """The training cut a registered model records (``data_window.as_of``), if any."""
    try:
        raw = registry.lookup(uri).data_window.get("as_of")
        return None if raw is None else datetime.fromisoformat(str(raw)).replace(tzinfo=None)
    except (ModelError, OSError, ValueError):  # no such entry or no readable cut: unknown
        return None
