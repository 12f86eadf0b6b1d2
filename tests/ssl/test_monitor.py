"""The weighted kNN monitor on hand-made features."""

from __future__ import annotations

import math

import torch

from sslbackdoor.ssl.monitor import knn_predict, knn_scores

BANK = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
LABELS = torch.tensor([0, 1, 1, 0])


def test_knn_scores_are_exp_weighted_votes_of_the_top_k() -> None:
    query = torch.tensor([[0.6, 0.8]])  # similarities 0.6, 0.96, 0.8, -0.6
    scores = knn_scores(query, BANK, LABELS, num_classes=2, k=3, temperature=0.5)
    expected = torch.tensor([[math.exp(0.6 / 0.5), math.exp(0.96 / 0.5) + math.exp(0.8 / 0.5)]])
    assert torch.allclose(scores, expected, rtol=1e-5)
    assert knn_predict(query, BANK, LABELS, 2, k=3).tolist() == [1]


def test_temperature_decides_between_one_close_and_two_far_neighbours() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])  # similarities 1, 0.6, 0.6
    assert knn_predict(query, bank, labels, 2, k=3, temperature=0.1).tolist() == [0]
    assert knn_predict(query, bank, labels, 2, k=3, temperature=10.0).tolist() == [1]


def test_k_is_capped_at_the_bank_size_and_queries_are_chunked() -> None:
    queries = torch.nn.functional.normalize(torch.randn(7, 2), dim=1)
    whole = knn_scores(queries, BANK, LABELS, 2, k=200)
    chunked = knn_scores(queries, BANK, LABELS, 2, k=200, chunk=3)
    assert whole.shape == (7, 2) and torch.allclose(whole, chunked)
