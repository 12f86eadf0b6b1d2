import math

import pytest
import torch

from sslbackdoor.ssl.moco import KeyQueue, moco_loss, momentum_copy, momentum_update


def test_moco_loss_matches_hand_computation() -> None:
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.0, 2.0]])           # cos(q, k) = 0
    queue = torch.tensor([[1.0, 0.0], [-3.0, 0.0]])  # cos = 1 and −1
    t = 0.5
    expected = -math.log(math.exp(0 / t) / (math.exp(0 / t) + math.exp(1 / t) + math.exp(-1 / t)))
    assert moco_loss(q, k, queue, temperature=t).item() == pytest.approx(expected, rel=1e-6)


def test_no_gradient_reaches_keys_or_queue() -> None:
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    moco_loss(q, k, torch.randn(16, 8)).backward()
    assert q.grad is not None and k.grad is None


def test_momentum_update_is_an_ema_and_copy_is_frozen() -> None:
    online = torch.nn.Linear(2, 2)
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online.weight.fill_(1.0)
        target.weight.fill_(0.0)
    momentum_update(online, target, momentum=0.9)
    assert torch.allclose(target.weight, torch.full((2, 2), 0.1))


def test_queue_is_first_in_first_out_and_wraps() -> None:
    queue = KeyQueue(size=3, dim=2)
    queue.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    queue.enqueue(torch.tensor([[-1.0, 0.0], [0.0, -1.0]]))
    assert queue.keys.tolist() == [[0.0, -1.0], [0.0, 1.0], [-1.0, 0.0]]
    assert queue.pointer == 1
    with pytest.raises(ValueError, match="cannot enqueue 4 keys"):
        queue.enqueue(torch.ones(4, 2))
