"""Recommendation strategies: the API serving and evaluation call (batch-first).

A :class:`ModelBundle` holds every trained component; ``bundle.strategy(name)`` returns a
:class:`Strategy`. Names follow the spec's Experiment 1 plus two baselines:

====================  ==========================================================  ==========
name                  candidates (stage 1)                                        ranking
====================  ==========================================================  ==========
``collaborative_only``  ALS scores ``u . v`` (index search)                       by score
``content_based``     context model: adoption rate given role / team / plan /      by score
                      industry, shrunk to the global rate
``hybrid``            ALS top ``n_candidates`` (20) via the index; cold-start users   bandit
                      (< ``cold_start_max_events`` events) get context-model
                      candidates. Scored by a blend of the next-adoption model
                      (:mod:`featurerec.models.adoption`), the ALS percentile and
                      the context model's lift over the global rate, with weights
                      fitted on a validation window (conditional logit)
``sequence_aware``    hybrid candidates; the blend also weighs the transition       bandit
                      probabilities from the user's recent features
``popularity``        share of users who use the feature                          by score
``random``            uniform (seeded hash of user id)                            uniform
====================  ==========================================================  ==========

Usage (serving: one request = a batch of one; evaluation: thousands)::

    bundle = load_bundle(ranker=ranker_dir, mf=mf_dir, index=index_dir)
    strat = bundle.strategy("sequence_aware")
    exclude = np.zeros((len(users), bundle.n_items), bool)     # True = never recommend
    ids, scores = strat.candidates(users, k=20, exclude=exclude)
    ranked = strat.rank(users, ids, scores, k=3, rng=np.random.default_rng(seed), explore=True)
    bundle.features[ranked.ids[0, 0]]      # feature name (ids are -1 where padded)
    ranked.scores, ranked.propensities, ranked.components["context"], ranked.explored

Contracts:

- ``candidates(users, k, exclude) -> (ids, scores)``: ``ids`` (n, k) int64 item indexes into
  ``bundle.features``, -1 padded; ``scores`` (n, k) float32 in 0..1 (-inf at padding),
  sorted descending; an item with ``exclude[u, i]`` True (shape (n, n_items)) is never
  returned. ``exclude=None`` excludes the features the user already uses.
- ``rank(users, cand_ids, cand_scores, k, rng, explore) -> Ranked`` (see
  :class:`featurerec.models.ranking.Ranked`): picks ``k`` of the candidates; only ids from
  ``cand_ids`` appear, no duplicates, scores in 0..1, and ``propensities`` are the exact
  probability that the exploring policy shows that feature at that position
  (epsilon-greedy slates, epsilon from the bandit: 0.1 decayed by 0.995 per feedback
  batch). ``explore=False`` gives the deterministic greedy slate (propensity 1).
- ``recommend(users, k, exclude, rng, explore)`` = candidates then rank.
- ``Ranked.components``: per shown item, ``collaborative`` (ALS score as a 0..1
  percentile), ``context`` (context-model adoption probability), ``transition`` (summed
  transition probability from recent features), ``popularity`` (share of users using it),
  ``bandit`` (predicted reward percentile; NaN for strategies without the bandit); and
  ``Ranked.transition_from`` for sequence-aware reasons. Facts for reasons can also be
  read from ``bundle.context.attribute_rates`` (true adoption rates by role / team size).
- Scoring uses only :class:`UserState` (online state): no SQL, no warehouse.
- ``candidates`` / ``rank`` / ``components`` accept ``cache=strat.cache(users)`` so a
  caller that calls them separately computes each model's scores once (``recommend`` does).

Which blend weights, ALS setting and bandit shrinkage a bundle uses is decided by training
on a validation window (:mod:`featurerec.models.fit`); ``describe(bundle)`` prints them.
On a catalog of ~10 features the candidate stage keeps every eligible feature (top 20), so
the ranker decides; the ANN index matters for large catalogs, where
``Strategy.candidates`` retrieves ALS candidates through it before scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurerec.errors import ModelError
from featurerec.models.adoption import AdoptionModel
from featurerec.models.als import ALSScorer
from featurerec.models.bandit import ContextualBandit
from featurerec.models.base import UserState, top_k
from featurerec.models.baselines import PopularityScorer, RandomScorer
from featurerec.models.common import (
    Calibrator,
    ItemSpace,
    adopted_mask,
    read_artifact,
    write_artifact,
)
from featurerec.models.context import ContextScorer
from featurerec.models.index import ExactIndex, HNSWIndex, build_index, load_index
from featurerec.models.ranking import Ranked, epsilon_slates
from featurerec.models.sequence import SequenceScorer

STRATEGIES = (
    "collaborative_only",
    "content_based",
    "hybrid",
    "sequence_aware",
    "popularity",
    "random",
)
BANDIT_STRATEGIES = ("hybrid", "sequence_aware")


#: Signals blended into the hybrid candidate score (sequence_aware adds "transition").
BLEND_SIGNALS: dict[str, tuple[str, ...]] = {
    "hybrid": ("adoption", "collaborative", "context_lift"),
    "sequence_aware": ("adoption", "collaborative", "context_lift", "transition"),
}


@dataclass(frozen=True)
class BundleConfig:
    """Knobs of the composed strategies (stored with the ranker artifact)."""

    cold_start_max_events: int = 5
    n_candidates: int = 20
    #: hybrid: weights of ``BLEND_SIGNALS["hybrid"]`` in the candidate score, fitted on a
    #: validation window (:func:`featurerec.models.fit.train_bundle`); equal weights
    #: when there is none.
    hybrid_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    #: sequence_aware: weights of ``BLEND_SIGNALS["sequence_aware"]`` (same fit).
    sequence_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    #: Exploration for strategies without a bandit (the bandit's own decays).
    exploration_rate: float = 0.1
    version: str = ""

    def __post_init__(self) -> None:
        for name, w in (("hybrid", self.hybrid_weights), ("sequence_aware", self.sequence_weights)):
            if len(w) != len(BLEND_SIGNALS[name]) or not all(np.isfinite(w)):
                raise ModelError(
                    f"bundle: {name} weights must be {len(BLEND_SIGNALS[name])} finite numbers "
                    f"({', '.join(BLEND_SIGNALS[name])}); got {list(w)}"
                )
        if self.n_candidates <= 0:
            raise ModelError(f"bundle: n_candidates must be > 0 (got {self.n_candidates})")

    def weights(self, strategy: str) -> tuple[float, ...]:
        return self.hybrid_weights if strategy == "hybrid" else self.sequence_weights


@dataclass
class ModelBundle:
    """Every trained component a strategy needs; built by training or :func:`load_bundle`."""

    features: list[str]
    context: ContextScorer
    popularity: PopularityScorer
    random: RandomScorer
    als: ALSScorer | None = None
    index: ExactIndex | HNSWIndex | None = None
    sequence: SequenceScorer | None = None
    adoption: AdoptionModel | None = None
    bandits: dict[str, ContextualBandit] = field(default_factory=dict)
    calibrators: dict[str, Calibrator] = field(default_factory=dict)
    config: BundleConfig = field(default_factory=BundleConfig)

    def __post_init__(self) -> None:
        self.space = ItemSpace(self.features)
        comps: list[tuple[str, Any]] = [
            ("context", self.context),
            ("popularity", self.popularity),
            ("als", self.als),
            ("sequence", self.sequence),
            ("adoption", self.adoption),
            *self.bandits.items(),
        ]
        for name, comp in comps:
            if comp is not None and comp.space.features != self.features:
                raise ModelError(
                    f"bundle: component {name!r} was trained on features "
                    f"{comp.space.features[:5]}..., not the bundle's {self.features[:5]}..."
                )
        if self.index is not None and self.index.features != self.features:
            raise ModelError("bundle: the item index was built on a different feature list")
        if self.als is not None and self.index is None:
            self.index = build_index(self.als.item_factors, self.features)

    @property
    def n_items(self) -> int:
        return len(self.features)

    def available(self) -> list[str]:
        """Strategies this bundle can serve (ALS-based ones need the MF model)."""
        out = ["content_based", "popularity", "random"]
        if self.als is not None:
            out[:0] = ["collaborative_only"]
            if "hybrid" in self.bandits:
                out.append("hybrid")
            if "sequence_aware" in self.bandits and self.sequence is not None:
                out.append("sequence_aware")
        return [s for s in STRATEGIES if s in out]

    def strategy(self, name: str) -> Strategy:
        if name not in STRATEGIES:
            raise ModelError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
        if name not in self.available():
            raise ModelError(
                f"strategy {name!r} needs components this bundle lacks "
                f"(available: {', '.join(self.available())})"
            )
        return Strategy(name, self)

    # -- calibrated component scores (n, n_items) -----------------------------------------
    def calibrated(self, component: str, raw: np.ndarray) -> np.ndarray:
        cal = self.calibrators.get(component)
        return cal(raw) if cal is not None else np.clip(raw, 0, 1).astype(np.float32)

    def cold(self, users: Sequence[UserState]) -> np.ndarray:
        cut = self.config.cold_start_max_events
        return np.array([u.event_count < cut for u in users], dtype=bool)

    def save(self, root: Path) -> None:
        """Write ``root/{mf,index,ranker}`` (see :func:`load_bundle`)."""
        root = Path(root)
        if self.als is not None:
            self.als.save(root / "mf")
            if "als" in self.calibrators:
                write_artifact(
                    root / "mf" / "calibrator",
                    "calibrator",
                    {},
                    {"q": self.calibrators["als"].quantiles},
                )
        if self.index is not None:
            self.index.save(root / "index")
        self.save_ranker(root / "ranker")

    def save_ranker(self, path: Path) -> None:
        """The ranker artifact: bandits + context / sequence / popularity models and the
        calibrators they were trained against (they travel together)."""
        path = Path(path)
        self.context.save(path / "context")
        self.popularity.save(path / "popularity")
        self.random.save(path / "random")
        if self.sequence is not None:
            self.sequence.save(path / "sequence")
        if self.adoption is not None:
            self.adoption.save(path / "adoption")
        for name, b in self.bandits.items():
            b.save(path / f"bandit_{name}")
        write_artifact(
            path,
            "ranker",
            {
                "features": self.features,
                "config": asdict(self.config),
                "bandits": sorted(self.bandits),
                "has_sequence": self.sequence is not None,
                "has_adoption": self.adoption is not None,
            },
            {f"cal_{k}": v.quantiles for k, v in self.calibrators.items() if k != "als"},
        )


def load_bundle(
    root: Path | None = None,
    *,
    ranker: Path | None = None,
    mf: Path | None = None,
    index: Path | None = None,
) -> ModelBundle:
    """Load a bundle from ``root`` (with ``mf/``, ``index/``, ``ranker/``) or from the
    three registry artifacts; explicit paths win over ``root``. ``mf`` and ``index`` are
    optional (without them only content_based / popularity / random are available)."""
    if root is not None:
        root = Path(root)
        ranker = ranker or root / "ranker"
        mf = mf or (root / "mf" if (root / "mf").exists() else None)
        index = index or (root / "index" if (root / "index").exists() else None)
    if ranker is None:
        raise ModelError("load_bundle: give a bundle folder or the ranker artifact path")
    ranker = Path(ranker)
    meta, arrays = read_artifact(ranker, "ranker")
    calibrators = {k.removeprefix("cal_"): Calibrator(v) for k, v in arrays.items()}
    als = None
    if mf is not None:
        als = ALSScorer.load(Path(mf))
        cal_dir = Path(mf) / "calibrator"
        if cal_dir.exists():
            _, cal = read_artifact(cal_dir, "calibrator")
            calibrators["als"] = Calibrator(cal["q"])
    return ModelBundle(
        features=list(meta["features"]),
        context=ContextScorer.load(ranker / "context"),
        popularity=PopularityScorer.load(ranker / "popularity"),
        random=RandomScorer.load(ranker / "random"),
        als=als,
        index=load_index(Path(index)) if index is not None else None,
        sequence=SequenceScorer.load(ranker / "sequence") if meta["has_sequence"] else None,
        adoption=AdoptionModel.load(ranker / "adoption") if meta.get("has_adoption") else None,
        bandits={b: ContextualBandit.load(ranker / f"bandit_{b}") for b in meta["bandits"]},
        calibrators=calibrators,
        config=_config_from_meta(meta["config"]),
    )


def _config_from_meta(raw: dict[str, Any]) -> BundleConfig:
    unknown = sorted(set(raw) - set(BundleConfig.__dataclass_fields__))
    if unknown:
        raise ModelError(
            f"ranker artifact: config keys {unknown} are not known to this version "
            "(an artifact from an older featurerec: retrain it with `featurerec pipeline run`)"
        )
    kw = dict(raw)
    for k in ("hybrid_weights", "sequence_weights"):
        if k in kw:
            kw[k] = tuple(float(x) for x in kw[k])
    return BundleConfig(**kw)


class ScoreCache:
    """Component scores of one batch of users, each computed at most once.

    ``recommend`` makes one and hands it to ``candidates`` and ``rank``; callers that call
    those two themselves may pass ``cache=strategy.cache(users)`` to both (optional)."""

    def __init__(self, bundle: ModelBundle, users: Sequence[UserState]) -> None:
        self.bundle = bundle
        self.users = users
        self._c: dict[str, np.ndarray] = {}

    def get(self, name: str) -> np.ndarray:
        """``als`` / ``context`` / ``sequence`` (0..1 percentiles), ``context_raw``,
        ``sequence_raw``, ``popularity``, ``random``, ``adoption`` (next-adoption logit,
        0 without the model), ``context_lift`` (log of the context model's rate over the
        global one), ``collaborative`` (ALS percentile; popularity for users without
        history): (n, n_items)."""
        if name not in self._c:
            b, u = self.bundle, self.users
            if name == "als_factors":
                assert b.als is not None
                out = b.als.user_factors(u)
            elif name == "als":
                assert b.als is not None
                raw = self.get("als_factors") @ np.asarray(b.als.item_factors).T
                out = b.calibrated("als", raw.astype(np.float32))
            elif name == "context_raw":
                out = b.context.score(u)
            elif name == "context":
                out = b.calibrated("context", self.get("context_raw"))
            elif name == "sequence_raw":
                assert b.sequence is not None
                out = b.sequence.score(u)
            elif name == "sequence":
                out = b.calibrated("sequence", self.get("sequence_raw"))
            elif name == "popularity":
                out = b.popularity.score(u)
            elif name == "random":
                out = b.random.score(u)
            elif name == "adoption":
                if b.adoption is None:
                    out = np.zeros((len(u), b.n_items), dtype=np.float32)
                else:
                    out = b.adoption.score(u)
            elif name == "context_lift":
                glob = np.clip(b.context.global_rate, 1e-4, 1)[None, :]
                out = np.log(np.clip(self.get("context_raw"), 1e-4, 1) / glob)
            elif name == "collaborative":
                assert b.als is not None
                out = self.get("als")
                # users with no usable interactions: ALS has nothing; popularity instead
                no_hist = np.asarray(
                    [not any(f in b.space.index for f in x.interactions) for x in u], dtype=bool
                ).reshape(len(u))
                if no_hist.any():
                    out = np.where(no_hist[:, None], self.get("popularity"), out)
            else:
                raise KeyError(name)
            self._c[name] = out
        return self._c[name]


class Strategy:
    """One named strategy over a bundle (cheap to create; holds no per-request state)."""

    def cache(self, users: Sequence[UserState]) -> ScoreCache:
        return ScoreCache(self.bundle, users)

    def __init__(self, name: str, bundle: ModelBundle) -> None:
        self.name = name
        self.bundle = bundle

    # -- stage 1 --------------------------------------------------------------------------
    def _check(self, users: Sequence[UserState], exclude: np.ndarray | None) -> np.ndarray:
        b = self.bundle
        if exclude is None:
            return adopted_mask(users, b.space)
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != (len(users), b.n_items):
            raise ModelError(
                f"exclude mask has shape {exclude.shape}, expected ({len(users)}, {b.n_items})"
            )
        return exclude

    def full_scores(
        self, users: Sequence[UserState], cache: ScoreCache | None = None
    ) -> np.ndarray:
        """(n, n_items) candidate-stage scores in 0..1 for every item (no exclusion)."""
        b = self.bundle
        c = cache or self.cache(users)
        if self.name in ("popularity", "random"):
            return c.get(self.name)
        if self.name == "content_based":
            return c.get("context_raw")
        if self.name == "collaborative_only":
            return c.get("collaborative").astype(np.float32)
        return b.calibrated(self.name, self.blend_raw(users, c))

    def blend_signals(
        self, users: Sequence[UserState], cache: ScoreCache | None = None
    ) -> np.ndarray:
        """(n, n_items, d) the signals hybrid / sequence_aware blend (``BLEND_SIGNALS``)."""
        c = cache or self.cache(users)
        b = self.bundle
        cols = []
        for sig in BLEND_SIGNALS[self.name]:
            if sig == "transition":
                m = c.get("sequence") if b.sequence is not None else None
            else:
                m = c.get(sig)
            cols.append(
                np.zeros((len(users), b.n_items)) if m is None else np.asarray(m, np.float64)
            )
        return np.stack(cols, axis=2)

    def blend_raw(self, users: Sequence[UserState], cache: ScoreCache | None = None) -> np.ndarray:
        """(n, n_items) the linear blend of :meth:`blend_signals` (before calibration)."""
        w = np.asarray(self.bundle.config.weights(self.name), dtype=np.float64)
        return np.asarray(self.blend_signals(users, cache) @ w)

    def candidates(
        self,
        users: Sequence[UserState],
        k: int,
        exclude: np.ndarray | None = None,
        *,
        cache: ScoreCache | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` candidate ids and 0..1 scores per user; never an excluded item."""
        if k <= 0:
            raise ModelError(f"candidates: k must be > 0 (got {k})")
        exclude = self._check(users, exclude)
        b = self.bundle
        cache = cache or self.cache(users)
        if self.name in BANDIT_STRATEGIES:
            cold = b.cold(users)
            if cold.any():
                # cold-start users: candidates come from the context model
                n_ctx = max(k, b.config.n_candidates)
                ctx_ids, _ = top_k(cache.get("context_raw")[cold], n_ctx, exclude[cold])
                allowed = np.zeros((int(cold.sum()), b.n_items), dtype=bool)
                rows = np.repeat(np.arange(len(ctx_ids)), ctx_ids.shape[1])
                flat = ctx_ids.ravel()
                allowed[rows[flat >= 0], flat[flat >= 0]] = True
                exclude = exclude.copy()
                exclude[cold] |= ~allowed
        if self.name in ("collaborative_only", "hybrid", "sequence_aware") and (
            b.index is not None and b.als is not None and isinstance(b.index, HNSWIndex)
        ):
            return self._index_candidates(users, k, exclude, cache)
        ids, vals = top_k(self.full_scores(users, cache), k, exclude)
        return ids.astype(np.int64), vals.astype(np.float32)

    def _index_candidates(
        self,
        users: Sequence[UserState],
        k: int,
        exclude: np.ndarray,
        cache: ScoreCache | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Large catalogs: ANN retrieval of ALS candidates, then this strategy's scores on
        them (cold users and users without history are scored over every item)."""
        b = self.bundle
        assert b.als is not None and b.index is not None
        n = len(users)
        cache = cache or self.cache(users)
        uf = cache.get("als_factors")
        cand, _ = b.index.search(uf, max(k, b.config.n_candidates), exclude)
        full = self.full_scores(users, cache)
        safe = np.maximum(cand, 0)
        vals = np.where(cand >= 0, np.take_along_axis(full, safe, axis=1), -np.inf)
        no_factors = np.asarray(~uf.any(axis=1), dtype=bool)
        fallback = no_factors if self.name == "collaborative_only" else b.cold(users) | no_factors
        order = np.argsort(-vals, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(cand, order, axis=1)
        scores = np.take_along_axis(vals, order, axis=1)
        if fallback.any():
            fi, fv = top_k(full[fallback], k, exclude[fallback])
            ids[fallback], scores[fallback] = fi, fv
        ids = np.where(np.isneginf(scores), -1, ids)
        return ids.reshape(n, k).astype(np.int64), scores.astype(np.float32)

    # -- stage 2 --------------------------------------------------------------------------
    def epsilon(self) -> float:
        bandit = self.bundle.bandits.get(self.name) or self.bundle.bandits.get("hybrid")
        return bandit.epsilon if bandit is not None else self.bundle.config.exploration_rate

    def rank(
        self,
        users: Sequence[UserState],
        cand_ids: np.ndarray,
        cand_scores: np.ndarray,
        k: int,
        rng: np.random.Generator | None = None,
        explore: bool = True,
        *,
        cache: ScoreCache | None = None,
    ) -> Ranked:
        """Order candidates and pick ``k`` (see the module docstring for the contract)."""
        cache = cache or self.cache(users)
        if k <= 0:
            raise ModelError(f"rank: k must be > 0 (got {k})")
        cand_ids = np.asarray(cand_ids, dtype=np.int64)
        cand_scores = np.asarray(cand_scores, dtype=np.float64)
        if cand_ids.shape != cand_scores.shape or cand_ids.shape[0] != len(users):
            raise ModelError(
                f"rank: cand_ids {cand_ids.shape} and cand_scores {cand_scores.shape} must "
                f"both be (n_users={len(users)}, n_candidates)"
            )
        rng = rng if rng is not None else np.random.default_rng(0)
        valid = cand_ids >= 0
        # duplicates in the candidate list: keep the first occurrence only
        if cand_ids.shape[1] > 1:
            srt = np.sort(np.where(valid, cand_ids, -1 - np.arange(cand_ids.shape[1])), axis=1)
            if (srt[:, 1:] == srt[:, :-1]).any():
                valid = np.asarray(valid & _first_occurrence(cand_ids))
        bandit = self.bundle.bandits.get(self.name)
        if bandit is not None:
            greedy = bandit.predict(
                users,
                cand_ids,
                self.signals(users, cand_ids, np.where(valid, cand_scores, 0.0), cache=cache),
            )
        else:
            greedy = cand_scores
        greedy = np.where(valid, np.nan_to_num(greedy, nan=-1e9), -np.inf)
        if self.name == "random":
            # the random policy: a uniform permutation of the candidates
            cols, prop, explored = epsilon_slates(greedy, valid, k, 1.0, rng, explore)
            if not explore:
                cols, prop, explored = epsilon_slates(greedy, valid, k, 0.0, rng, False)
        else:
            cols, prop, explored = epsilon_slates(greedy, valid, k, self.epsilon(), rng, explore)
        safe = np.maximum(cols, 0)
        ids = np.where(cols >= 0, np.take_along_axis(cand_ids, safe, axis=1), -1)
        if bandit is not None:
            shown = bandit.calibrated(np.take_along_axis(greedy, safe, axis=1))
        else:
            shown = np.take_along_axis(cand_scores, safe, axis=1)
        scores = np.where(cols >= 0, np.clip(np.nan_to_num(shown, neginf=0.0), 0, 1), 0.0)
        components = self.components(users, ids, cache=cache)
        if bandit is not None:
            components["bandit"] = np.where(cols >= 0, scores, np.nan)
        trans_from = None
        if self.name == "sequence_aware" and self.bundle.sequence is not None:
            trans_from = self.bundle.sequence.strongest_source(users, ids)
        return Ranked(
            ids=ids.astype(np.int64),
            scores=scores.astype(np.float32),
            propensities=prop,
            explored=explored,
            components=components,
            transition_from=trans_from,
        )

    def signals(
        self,
        users: Sequence[UserState],
        cand_ids: np.ndarray,
        cand_scores: np.ndarray,
        *,
        cache: ScoreCache | None = None,
    ) -> np.ndarray:
        """(n, c, 2) bandit inputs per candidate: the candidate score and the context
        model's percentile (a shared, shrunk estimate of fit for the user's segment)."""
        ctx = (cache or self.cache(users)).get("context")
        safe = np.maximum(cand_ids, 0)
        ctx_c = np.where(cand_ids >= 0, np.take_along_axis(ctx, safe, axis=1), 0.0)
        return np.stack([np.asarray(cand_scores, dtype=np.float64), ctx_c], axis=2)

    def recommend(
        self,
        users: Sequence[UserState],
        k: int = 3,
        exclude: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
        explore: bool = False,
    ) -> Ranked:
        """Candidates (``config.n_candidates``) then rank."""
        n_cand = max(k, self.bundle.config.n_candidates)
        cache = self.cache(users)
        ids, scores = self.candidates(users, n_cand, exclude, cache=cache)
        return self.rank(users, ids, scores, k, rng, explore, cache=cache)

    def components(
        self, users: Sequence[UserState], ids: np.ndarray, *, cache: ScoreCache | None = None
    ) -> dict[str, np.ndarray]:
        """Per-item signals for the given ids (n, k): see the module docstring."""
        b = self.bundle
        c = cache or self.cache(users)
        safe = np.maximum(ids, 0)
        pad = ids < 0

        def gather(m: np.ndarray) -> np.ndarray:
            return np.where(pad, np.nan, np.take_along_axis(m, safe, axis=1))

        out: dict[str, np.ndarray] = {
            "context": gather(c.get("context_raw")),
            "popularity": gather(c.get("popularity")),
        }
        if b.als is not None:
            out["collaborative"] = gather(c.get("als"))
        if b.sequence is not None:
            out["transition"] = gather(c.get("sequence_raw"))
        return out


def _first_occurrence(ids: np.ndarray) -> np.ndarray:
    """Bool mask, True at the first occurrence of each id in its row."""
    n, c = ids.shape
    order = np.argsort(ids, axis=1, kind="stable")
    srt = np.take_along_axis(ids, order, axis=1)
    first_sorted = np.ones((n, c), dtype=bool)
    first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
    out = np.zeros((n, c), dtype=bool)
    np.put_along_axis(out, order, first_sorted, axis=1)
    return out


def describe(bundle: ModelBundle) -> dict[str, Any]:
    """A short JSON-able summary of a bundle (for logs and `models show`)."""
    return {
        "features": len(bundle.features),
        "strategies": bundle.available(),
        "als": None if bundle.als is None else asdict(bundle.als.params),
        "index": None if bundle.index is None else bundle.index.kind,
        "bandits": {
            k: {"updates": v.updates, "epsilon": v.epsilon} for k, v in bundle.bandits.items()
        },
        "config": asdict(bundle.config),
        "arm_precision": {k: v.params.arm_precision for k, v in bundle.bandits.items()},
    }
