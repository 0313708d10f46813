"""Off-policy evaluation of a candidate model on a deployment's own recommendation log.

Serving writes, next to every served request's recommendations (``ml.recommendation_log``,
with the logging policy's propensity of each item), the decision it made them on
(``ml.recommendation_context``: the user state the model scored and the features the
eligibility rules left; :func:`featurerec.serving.service.decision_context`). This module
reads both back with the rounds' rewards (:mod:`featurerec.experiments.rounds`), replays a
candidate model on each logged decision, and estimates the candidate's CTR and 7-day
adoption per recommendation with :mod:`featurerec.experiments.ope`'s estimators::

    decisions = load_logged_decisions(engine, model.features, as_of=..., start=..., end=...)
    dist_fn = lambda req: target_slate_dist(model, "hybrid", [decisions.users[i] for i in req],
                                            decisions.exclude_rows(req), k, top_k, eps)
    results = evaluate(decisions, dist_fn, k=k)   # one CandidateEstimate per metric

The candidate is replayed with the serving path's own candidate and slate logic
(:func:`featurerec.models.ranking.slate_distribution`), so when the candidate *is* the
logging policy every importance weight is 1 and the estimate equals the logged rate
(``tests/test_experiment_ope_cli.py`` checks this end to end).

What a one-step estimate means: the candidate's value on the logged users *as they were*
when the log was written. A policy that runs for weeks changes its own users' histories (it
repeats what it showed, users adopt and move on), which this cannot see; the simulated
online experiment (``featurerec simulate experiment``) measures how far that carries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
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
from featurerec.models.ranking import slate_distribution

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
    )


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

    ``estimates``: IPS, SNIPS and DR; ``logged``: the logging policy's own rate on the same
    rounds (what the log observed), for reference; ``empty_mass``: the candidate's mean
    probability of showing nothing in a logged slot (counted as reward 0, so it pulls the
    estimate down; nonzero when the candidate serves fewer items than the log did);
    ``unlogged_mass``: its mean probability, per logged slot, of an item the logging policy
    never showed in this log (no support: the estimate cannot see that item's reward);
    ``strata``: SNIPS by first / second / later showing of the logged item."""

    metric: str
    n: int
    estimates: dict[str, OPEEstimate]
    logged: st.Estimate
    empty_mass: float
    unlogged_mass: float
    strata: dict[str, StratumEstimate]


#: A request chunk's slate distribution is (chunk, n_items, k) float64; chunks are sized
#: to keep it under this many cells (~130 MB).
CHUNK_CELLS = 1 << 24


def chunk_size(n_items: int, k: int) -> int:
    """Requests per chunk so that a chunk's (chunk, n_items, k) array stays < CHUNK_CELLS."""
    return max(1, min(4096, CHUNK_CELLS // max(1, n_items * k)))


def evaluate(
    decisions: LoggedDecisions,
    dist_fn: Callable[[np.ndarray], np.ndarray],
    metrics: tuple[str, ...] = tuple(METRICS),
    min_rounds: int = 50,
    k: int | None = None,
) -> dict[str, CandidateEstimate | str]:
    """Per metric: the candidate's :class:`CandidateEstimate`, or a sentence saying why not
    (fewer than ``min_rounds`` rounds whose window has closed). ``dist_fn(requests)`` gives
    the candidate's slate distribution for those request indices, (len, n_items, >= k) as
    :func:`target_slate_dist`; it is called chunk by chunk, and only each round's per-slot
    terms are kept (the candidate's probability of the logged item, its expected reward-model
    value, its empty and unlogged mass), so memory does not grow with items x requests.
    Intervals are user-clustered; DR's reward model is the mean reward per (event-count
    bucket, item)."""
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
    q_expected = {m: np.zeros(d.n) for m in q}
    by_request = np.argsort(d.request, kind="stable")
    bounds = np.searchsorted(d.request[by_request], np.arange(len(d.users) + 1))
    step = chunk_size(n_items, k)
    for r0 in range(0, len(d.users), step):
        r1 = min(r0 + step, len(d.users))
        sel = by_request[bounds[r0] : bounds[r1]]
        if not sel.size:
            continue
        dist = dist_fn(np.arange(r0, r1))
        if dist.shape[:2] != (r1 - r0, n_items) or dist.shape[2] < k:
            raise DataError(
                f"dist_fn must give (requests, items, >= {k}) = ({r1 - r0}, {n_items}, {k}), "
                f"got {dist.shape}"
            )
        at = dist[d.request[sel] - r0, :, d.position[sel]]  # (rounds, items)
        a = d.action[sel]
        known = a < n_items
        target[sel] = np.where(known, at[np.arange(sel.size), np.minimum(a, n_items - 1)], 0.0)
        slot_mass[sel] = at.sum(axis=1)
        unlogged[sel] = at[:, unlogged_items].sum(axis=1)
        for m, table in q.items():
            q_expected[m][sel] = np.einsum("ri,ri->r", at, table[ctx[sel], :n_items])
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
                q_logged=q[metric][ctx[closed], d.action[closed]],
                q_expected=q_expected[metric][closed],
                groups=g,
            ),
            logged=online_rate(d.rounds.subset(closed), metric),
            empty_mass=float(np.clip(1.0 - slot_mass[closed], 0.0, 1.0).mean()),
            unlogged_mass=float(unlogged[closed].mean()),
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
) -> CandidateReport:
    """Replay a registered model (the deployment's, with any URI overridden) with
    ``strategy`` on the logged decisions in [``since``, ``until``] and estimate its CTR and
    7-day adoption per recommendation. Serving's slate settings (``output_k``,
    ``candidate_generator.top_k``, ``exploration_rate``) are the deployment's."""
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

    def dist_fn(requests: np.ndarray) -> np.ndarray:
        users = [decisions.users[i] for i in requests.tolist()]
        exclude = decisions.exclude_rows(requests)
        return target_slate_dist(model, name, users, exclude, k, dep.candidate_generator.top_k, eps)

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
        results=evaluate(decisions, dist_fn, k=k),
    )


def _trained_as_of(registry: Any, uri: str) -> datetime | None:
    """The training cut a registered model records (``data_window.as_of``), if any."""
    try:
        raw = registry.lookup(uri).data_window.get("as_of")
        return None if raw is None else datetime.fromisoformat(str(raw)).replace(tzinfo=None)
    except (ModelError, OSError, ValueError):  # no such entry or no readable cut: unknown
        return None
