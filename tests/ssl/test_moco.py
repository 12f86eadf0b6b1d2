"""MoCo v2's pieces: loss, momentum update, the key queue and the model with shuffled BN."""

from __future__ import annotations

import math

import pytest
import torch

from sslbackdoor.models.encoders import Encoder
from sslbackdoor.ssl.moco import (
    KeyQueue,
    MoCoModel,
    moco_loss,
    momentum_copy,
    momentum_update,
)
from sslbackdoor.ssl.simclr import SimCLRModel


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


def test_queue_buffers_are_saved_and_restored() -> None:
    queue = KeyQueue(size=4, dim=3, generator=torch.Generator().manual_seed(0))
    queue.enqueue(torch.ones(3, 3))
    state = queue.state_dict()
    assert set(state) == {"keys", "position"} and int(state["position"]) == 3
    restored = KeyQueue(size=4, dim=3)
    assert restored.pointer == 0
    restored.load_state_dict(state)
    assert restored.pointer == 3 and torch.equal(restored.keys, queue.keys)
    restored.enqueue(torch.zeros(2, 3) + torch.tensor([1.0, 0.0, 0.0]))
    assert restored.pointer == 1
    assert restored.keys[3].tolist() == [1.0, 0.0, 0.0]


def _moco(tiny_encoder: Encoder) -> MoCoModel:
    torch.manual_seed(0)
    return MoCoModel(SimCLRModel(tiny_encoder, hidden_dim=16, out_dim=8), queue_size=32)


def test_moco_model_parts(tiny_encoder: Encoder) -> None:
    model = _moco(tiny_encoder)
    assert model.encoder is model.online.encoder
    assert all(not p.requires_grad for p in model.key_network.parameters())
    assert model.queue.keys.shape == (32, 8)
    images = torch.rand(6, 3, 16, 16)
    assert model(images).shape == (6, 8)
    keys = model.keys(images, bn_splits=2, generator=torch.Generator().manual_seed(0))
    assert keys.shape == (6, 8) and not keys.requires_grad
    # The module's state holds the online and the key network and the queue, no duplicates.
    assert {k.split(".")[0] for k in model.state_dict()} == {"online", "key_network", "queue"}
    # MoCo v2's head: Linear-ReLU-Linear, no BatchNorm (SimCLR's head has one).
    for network in (model.online, model.key_network):
        assert [type(m).__name__ for m in network.head] == ["Linear", "ReLU", "Linear"]


def test_keys_are_shuffled_batchnorm_chunks_put_back_in_order(tiny_encoder: Encoder) -> None:
    model = _moco(tiny_encoder).train()
    images = torch.rand(8, 3, 16, 16)
    keys = model.keys(images, bn_splits=2, generator=torch.Generator().manual_seed(5))
    order = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        first = model.key_network(images[order[:4]])   # each chunk: its own BN statistics
        second = model.key_network(images[order[4:]])
    expected = torch.empty(8, 8)
    expected[order] = torch.cat([first, second])
    assert torch.allclose(keys, expected, atol=1e-6)
    with torch.no_grad():
        whole = model.key_network(images)
    one_chunk = model.keys(images, bn_splits=1, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(one_chunk, whole, atol=1e-5)  # the order alone changes nothing
    assert not torch.allclose(keys, whole, atol=1e-3)   # split statistics do
    with pytest.raises(ValueError, match="equal BatchNorm chunks"):
        model.keys(images, bn_splits=3)


def test_key_network_follows_the_online_network(tiny_encoder: Encoder) -> None:
    model = _moco(tiny_encoder)
    online = dict(model.online.named_parameters())
    with torch.no_grad():
        for parameter in online.values():
            parameter.add_(1.0)
    before = {n: p.clone() for n, p in model.key_network.named_parameters()}
    model.update_key_network(0.9)
    for name, parameter in model.key_network.named_parameters():
        assert torch.allclose(parameter, 0.9 * before[name] + 0.1 * online[name]), name
