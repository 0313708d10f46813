"""Implicit-feedback matrix factorization (ALS, Hu, Koren & Volinsky 2008) with ``implicit``.

Confidence follows the paper: ``c_ui = 1 + alpha * strength_ui`` (the spec's interaction
strength in 0..1; spec defaults factors 64, regularization 0.01, iterations 15, alpha 40).
We pass ``1 + alpha * strength`` to implicit with its own ``alpha`` left at 1, so every
observed pair has confidence >= 1 (with implicit's raw ``alpha * strength`` a weak
interaction would count less than an unobserved one).

Scoring never uses stored user factors: a user's factors are recomputed from the
interactions in their :class:`UserState` with implicit's ``recalculate_user`` (one exact
least-squares solve against the fixed item factors, batched in C). So a user unseen at fit
time, or one with interactions newer than the model, is scored from online state alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from featurerec.errors import ModelError
from featurerec.models.base import TrainingData, UserState
from featurerec.models.common import ItemSpace, interactions_csr, read_artifact, write_artifact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ALSParams:
    """ALS hyperparameters (spec defaults)."""

    factors: int = 64
    regularization: float = 0.01
    iterations: int = 15
    alpha: float = 40.0

    def __post_init__(self) -> None:
        if self.factors <= 0:
            raise ModelError(f"als: factors must be > 0 (got {self.factors})")
        if self.regularization < 0:
            raise ModelError(f"als: regularization must be >= 0 (got {self.regularization})")
        if self.iterations <= 0:
            raise ModelError(f"als: iterations must be > 0 (got {self.iterations})")
        if self.alpha < 0:
            raise ModelError(f"als: alpha must be >= 0 (got {self.alpha})")


def _confidence(m: sp.csr_matrix, alpha: float) -> sp.csr_matrix:
    c = m.astype(np.float32).tocsr(copy=True)
    c.data = 1.0 + alpha * c.data
    return c


class ALSScorer:
    """ALS collaborative scores: ``user_factors(interactions) . item_factors``."""

    name = "als"

    def __init__(
        self, params: ALSParams | None = None, seed: int = 0, num_threads: int = 0
    ) -> None:
        self.params = params or ALSParams()
        self.seed = seed
        self.num_threads = num_threads
        self.space = ItemSpace([])
        self.item_factors = np.zeros((0, self.params.factors), dtype=np.float32)
        self._model: object | None = None
        self._yty: np.ndarray | None = None

    def _new_model(self) -> object:
        from implicit.cpu.als import AlternatingLeastSquares

        p = self.params
        # implicit warns at construction when any BLAS (faiss bundles its own OpenBLAS,
        # which ignores OPENBLAS_NUM_THREADS) has a thread pool; every call into it from
        # here runs under this same one-thread limit.
        with threadpool_limits(1, "blas"):
            return AlternatingLeastSquares(
                factors=p.factors,
                regularization=p.regularization,
                alpha=1.0,
                iterations=p.iterations,
                random_state=self.seed,
                num_threads=self.num_threads,
                use_cg=True,
            )

    def fit(self, data: TrainingData) -> Self:
        if not data.features:
            raise ModelError("als: the training data has no features")
        if data.matrix.nnz == 0:
            raise ModelError("als: the interaction matrix is empty (no user used any feature)")
        self.space = ItemSpace(data.features)
        model = self._new_model()
        with threadpool_limits(1, "blas"):
            model.fit(_confidence(data.matrix, self.params.alpha), show_progress=False)  # type: ignore[attr-defined]
        self.item_factors = np.ascontiguousarray(model.item_factors, dtype=np.float32)  # type: ignore[attr-defined]
        self._model = model
        self._yty = None
        return self

    @property
    def model(self) -> object:
        if self._model is None:
            model = self._new_model()
            model.item_factors = self.item_factors  # type: ignore[attr-defined]
            model.user_factors = np.zeros((1, self.params.factors), dtype=np.float32)  # type: ignore[attr-defined]
            self._model = model
        return self._model

    #: Batches up to this size are solved in numpy (no thread start-up: what a single
    #: serving request needs); larger ones go to implicit's parallel solver.
    small_batch: int = 256

    def user_factors(self, users: Sequence[UserState]) -> np.ndarray:
        """(n_users, factors) from each user's interactions; zero for users with none."""
        m = interactions_csr(users, self.space)
        if len(users) == 0:
            return np.zeros((0, self.params.factors), dtype=np.float32)
        conf = _confidence(m, self.params.alpha)
        if len(users) <= self.small_batch:
            f = self._solve_small(conf)
        else:
            with threadpool_limits(1, "blas"):
                f = self.model.recalculate_user(np.arange(len(users)), conf)  # type: ignore[attr-defined]
        f = np.asarray(f, dtype=np.float32).reshape(len(users), -1)
        f[np.diff(m.indptr) == 0] = 0.0
        return f

    def _solve_small(self, conf: sp.csr_matrix) -> np.ndarray:
        """The same least-squares step as implicit's ``recalculate_user`` (Hu et al.):
        ``(Y'Y + Y'(C_u - I)Y + reg I) x_u = Y' C_u p_u``, batched with numpy."""
        Y = self.item_factors.astype(np.float64)
        if self._yty is None:
            self._yty = Y.T @ Y + self.params.regularization * np.eye(Y.shape[1])
        c = np.asarray(conf.todense(), dtype=np.float64)  # (n, items), 0 = unobserved
        observed = c > 0
        w = np.where(observed, c - 1.0, 0.0)
        A = self._yty[None] + np.einsum("ni,if,ig->nfg", w, Y, Y, optimize=True)
        b = np.where(observed, c, 0.0) @ Y
        return np.linalg.solve(A, b[..., None])[..., 0]

    def score(self, users: Sequence[UserState]) -> np.ndarray:
        return (self.user_factors(users) @ self.item_factors.T).astype(np.float32)

    def save(self, path: Path) -> None:
        write_artifact(
            path,
            self.name,
            {"features": self.space.features, "params": asdict(self.params), "seed": self.seed},
            {"item_factors": self.item_factors},
        )

    @classmethod
    def load(cls, path: Path) -> Self:
        meta, arrays = read_artifact(path, cls.name)
        obj = cls(ALSParams(**meta["params"]), seed=int(meta["seed"]))
        obj.space = ItemSpace(meta["features"])
        obj.item_factors = arrays["item_factors"].astype(np.float32)
        if obj.item_factors.shape != (len(obj.space), obj.params.factors):
            raise ModelError(
                f"{path}: item_factors shape {obj.item_factors.shape} does not match "
                f"{len(obj.space)} features x {obj.params.factors} factors"
            )
        return obj
