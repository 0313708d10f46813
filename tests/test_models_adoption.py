"""The next-adoption model and the conditional-logit blend fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from featurerec.errors import ModelError
from featurerec.models.adoption import AdoptionModel, fit_blend, softmax_nll
from featurerec.models.base import TrainingData, UserContext, UserState


def test_softmax_nll_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, 6))
    chosen = np.zeros((5, 6), bool)
    chosen[np.arange(5), [0, 2, 3, 5, 1]] = True
    blocked = rng.random((5, 6)) < 0.3
    blocked &= ~chosen
    nll, g = softmax_nll(s, chosen, blocked)
    eps = 1e-6
    for i, j in [(0, 1), (2, 3), (4, 4), (1, 2)]:
        d = np.zeros_like(s)
        d[i, j] = eps
        num = softmax_nll(s + d, chosen, blocked)[0] - softmax_nll(s - d, chosen, blocked)[0]
        expected = num / (2 * eps) if not blocked[i, j] else 0.0
        assert g[i, j] == pytest.approx(expected, abs=1e-5)
    assert nll > 0


def test_fit_blend_recovers_known_weights() -> None:
    rng = np.random.default_rng(1)
    n, m, true_w = 4000, 8, np.array([2.0, -1.0, 0.5])
    x = rng.normal(size=(n, m, 3))
    u = x @ true_w + rng.gumbel(size=(n, m))  # conditional logit choices
    chosen = np.zeros((n, m), bool)
    chosen[np.arange(n), np.argmax(u, axis=1)] = True
    w = fit_blend(x, chosen, np.zeros((n, m), bool), l2=0.1)
    np.testing.assert_allclose(w, true_w, atol=0.15)


def _sequential_world(n_users: int = 1500, seed: int = 0) -> TrainingData:
    """Users adopt a or c first; a leads to b and c leads to d (80% each)."""
    rng = np.random.default_rng(seed)
    features = ["a", "b", "c", "d"]
    rows, cols, days = [], [], []
    contexts = {}
    for u in range(n_users):
        first = 0 if rng.random() < 0.5 else 2
        follow = {0: 1, 2: 3}[first] if rng.random() < 0.8 else {0: 3, 2: 1}[first]
        t0 = 19_950.0 + rng.uniform(0, 30)
        for j, t in ((first, t0), (follow, t0 + rng.uniform(1, 10))):
            rows.append(u)
            cols.append(j)
            days.append(t)
        contexts[f"u{u}"] = UserContext(account_age_days=400)
    shape = (n_users, len(features))
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
    first_used = sp.csr_matrix((np.asarray(days), (rows, cols)), shape=shape)
    return TrainingData(
        users=[f"u{u}" for u in range(n_users)],
        features=features,
        matrix=matrix,
        contexts=contexts,
        transitions={},
        recent={},
        event_counts={f"u{u}": 20 for u in range(n_users)},
        first_used=first_used,
        adopted_at=first_used.copy(),
    )


def test_adoption_model_learns_what_leads_to_what(tmp_path: Path) -> None:
    data = _sequential_world()
    model = AdoptionModel().fit(data)
    assert model.choices == 2 * len(data.users)
    ua = UserState("x", UserContext(account_age_days=400), interactions={"a": 1.0})
    uc = UserState("y", UserContext(account_age_days=400), interactions={"c": 1.0})
    s = model.score([ua, uc])
    assert s[0, 1] > s[0, 3] + 1.0  # a -> b
    assert s[1, 3] > s[1, 1] + 1.0  # c -> d
    assert model.W[0, 1] > model.W[0, 3]  # using "a" raises b, not d
    model.save(tmp_path / "adoption")
    again = AdoptionModel.load(tmp_path / "adoption")
    np.testing.assert_allclose(again.score([ua, uc]), s)


def test_adoption_model_without_first_uses_scores_zero() -> None:
    data = _sequential_world(50)
    data.first_used = None
    data.adopted_at = None
    model = AdoptionModel().fit(data)
    assert model.choices == 0
    assert not model.score([UserState("x")]).any()


def test_adoption_model_large_catalog_drops_pairwise_terms() -> None:
    data = _sequential_world(300)
    model = AdoptionModel(max_pair_items=3).fit(data)
    assert not model.pairwise and model.choices == 600
    assert model.score([UserState("x")]).shape == (1, 4)


def test_adoption_artifact_shape_mismatch_is_refused(tmp_path: Path) -> None:
    model = AdoptionModel().fit(_sequential_world(100))
    model.b = np.zeros(7)
    model.save(tmp_path / "bad")
    with pytest.raises(ModelError, match="do not match"):
        AdoptionModel.load(tmp_path / "bad")


def test_cv_blend_penalises_noise_more_than_signal() -> None:
    from featurerec.models.adoption import cv_blend

    rng = np.random.default_rng(2)
    n, m = 300, 8
    x = rng.normal(size=(n, m, 2))
    blocked = np.zeros((n, m), bool)
    strong = np.zeros((n, m), bool)
    strong[np.arange(n), np.argmax(3 * x[:, :, 0] + rng.gumbel(size=(n, m)), axis=1)] = True
    noise = np.zeros((n, m), bool)
    noise[np.arange(n), rng.integers(0, m, n)] = True
    fs, fn = cv_blend(x, strong, blocked), cv_blend(x, noise, blocked)
    w_s, l2_s, cv_s, table = fs.weights, fs.l2, fs.cv_nll, fs.table
    w_n, l2_n, cv_n = fn.weights, fn.l2, fn.cv_nll
    assert l2_s < l2_n
    assert w_s[0] > 1.5 and abs(w_n).max() < 0.3
    assert cv_s < cv_n <= np.log(m) + 0.05  # noise: about the uniform model's NLL
    assert [r["l2"] for r in table] == [0.1, 1.0, 10.0, 100.0]
    noise_table = fn.table
    # the out-of-fold per-row ndcg@5 is the chosen penalty's row of the table
    assert len(fs.oof_ndcg) == n
    chosen_row = next(r for r in table if r["l2"] == l2_s)
    assert fs.oof_ndcg.mean() == pytest.approx(chosen_row["cv_ndcg@5"], abs=1e-5)
    best_strong = max(r["cv_ndcg@5"] for r in table)
    assert best_strong > 0.6 > max(r["cv_ndcg@5"] for r in noise_table)
