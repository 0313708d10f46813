"""Metric functions pinned on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from featurerec.evaluation.metrics import (
    catalog_coverage,
    hit_rate_at_k,
    intra_list_diversity,
    item_similarity,
    ndcg_at_k,
    novelty,
    precision_at_k,
    recall_at_k,
)
from featurerec.evaluation.offline import add_gap_closed, paired_bootstrap

REC = np.array(
    [
        [0, 1, 2, 3, 4],  # relevant {1, 3}
        [4, 3, 2, 1, 0],  # relevant {4}
        [2, -1, -1, -1, -1],  # relevant {0}: padded list, miss
    ]
)
REL = np.zeros((3, 6), dtype=bool)
REL[0, [1, 3]] = True
REL[1, 4] = True
REL[2, 0] = True


def test_ndcg_pinned() -> None:
    d = ndcg_at_k(REC, REL, 5)
    dcg0 = 1 / math.log2(3) + 1 / math.log2(5)
    idcg0 = 1 / math.log2(2) + 1 / math.log2(3)
    assert d[0] == pytest.approx(dcg0 / idcg0)
    assert d[1] == pytest.approx(1.0)
    assert d[2] == 0.0
    # k smaller than the list: only the top k count
    assert ndcg_at_k(REC, REL, 1)[0] == 0.0


def test_hit_precision_recall_pinned() -> None:
    assert hit_rate_at_k(REC, REL, 3).tolist() == [1.0, 1.0, 0.0]
    assert hit_rate_at_k(REC, REL, 1).tolist() == [0.0, 1.0, 0.0]
    assert precision_at_k(REC, REL, 5).tolist() == pytest.approx([2 / 5, 1 / 5, 0.0])
    assert recall_at_k(REC, REL, 2).tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert recall_at_k(REC, REL, 5).tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_coverage_novelty_diversity_pinned() -> None:
    rec = np.array([[0, 1], [0, 2], [0, 1]])
    # 6 recommendations over 4 items: 0 x3, 1 x2, 2 x1, 3 x0
    assert catalog_coverage(rec, 4) == pytest.approx(3 / 4)
    assert catalog_coverage(rec, 4, min_share=0.3) == pytest.approx(2 / 4)
    pop = np.array([0.5, 0.1, 0.2, 0.0])
    assert novelty(rec, pop) == pytest.approx(np.mean([0.5, 0.9, 0.5, 0.8, 0.5, 0.9]))
    m = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=float))
    sim = item_similarity(m)
    # items 0 and 1: co-used by 2 users; |0| = 3, |1| = 2 -> 2 / sqrt(6)
    assert sim[0, 1] == pytest.approx(2 / math.sqrt(6))
    assert sim[0, 0] == pytest.approx(1.0)
    ild = intra_list_diversity(np.array([[0, 1], [0, -1]]), sim)
    assert ild[0] == pytest.approx(1 - 2 / math.sqrt(6))
    assert math.isnan(ild[1])


def test_gap_closed() -> None:
    rows = {
        "popularity": {"ndcg@5": 0.2, "hit_rate@3": 0.3},
        "oracle": {"ndcg@5": 0.6, "hit_rate@3": 0.7},
        "hybrid": {"ndcg@5": 0.4, "hit_rate@3": 0.4},
    }
    add_gap_closed(rows)
    assert rows["hybrid"]["gap_closed[ndcg@5]"] == pytest.approx(0.5)
    assert rows["hybrid"]["gap_closed[hit_rate@3]"] == pytest.approx(0.25)
    assert rows["oracle"]["gap_closed[ndcg@5]"] == pytest.approx(1.0)
    assert rows["hybrid"]["gap_to_perfect_closed[ndcg@5]"] == pytest.approx(0.2 / 0.8)
    # an oracle below popularity is no ceiling: NaN, not a misleading ratio
    rows = {
        "popularity": {"ndcg@5": 0.6, "hit_rate@3": 0.6},
        "oracle": {"ndcg@5": 0.5, "hit_rate@3": 0.5},
    }
    add_gap_closed(rows)
    assert math.isnan(rows["oracle"]["gap_closed[ndcg@5]"])


def test_paired_bootstrap_interval() -> None:
    targets = np.zeros((200, 4), dtype=bool)
    targets[:, 0] = True
    good = np.tile([0, 1, 2, 3], (200, 1))
    bad = np.tile([1, 2, 3, 0], (200, 1))
    d = paired_bootstrap(good, bad, targets, n_boot=200)
    mean, lo, hi = d["hit_rate@3"]
    assert mean == pytest.approx(1.0) and lo == pytest.approx(1.0)
    same = paired_bootstrap(good, good, targets, n_boot=200)
    assert same["ndcg@5"] == [0.0, 0.0, 0.0]
    # half the users better, half worse: the interval straddles 0
    mixed = np.where(np.arange(200)[:, None] % 2 == 0, good, bad)
    m, lo, hi = paired_bootstrap(mixed, np.tile([0, 3, 1, 2], (200, 1)), targets, n_boot=500)[
        "ndcg@5"
    ]
    assert lo < m < hi
