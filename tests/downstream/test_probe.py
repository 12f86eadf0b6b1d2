import pytest
import torch

from sslbackdoor.downstream.probe import ProbeConfig, build_probe, predict, train_probe


def test_mlp_has_the_papers_layers() -> None:
    layers = [type(m).__name__ for m in build_probe("mlp", 32, 5)]
    assert layers == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert build_probe("mlp", 32, 5)[0].out_features == 512


@pytest.mark.parametrize("kind", ["mlp", "linear", "eval-linear"])
def test_probe_learns_separable_features_and_is_seeded(kind: str) -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 3
    labels = torch.arange(300) % 3
    features = centres[labels] + torch.randn(300, 16, generator=generator) * 0.3
    config = ProbeConfig(kind=kind, epochs=20, lr=1e-2, batch_size=32)
    model_a = train_probe(features, labels, 3, config, seed=4)
    model_b = train_probe(features, labels, 3, config, seed=4)
    assert (predict(model_a, features) == labels).float().mean() > 0.95
    assert torch.equal(predict(model_a, features), predict(model_b, features))


def test_eval_linear_is_the_official_probe() -> None:
    """Normalised, standardised with the training features' statistics, one Linear layer,
    SGD with momentum and weight decay, the rate divided by 10 at 15/40 and 30/40."""
    features = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) * 5 + 3
    labels = torch.arange(64) % 2
    config = ProbeConfig(kind="eval-linear", epochs=40, lr=0.01, batch_size=16, weight_decay=1e-4)
    model = train_probe(features, labels, 2, config)
    norm, linear = model
    assert isinstance(linear, torch.nn.Linear)
    standardised = norm(features)
    assert torch.allclose(standardised.mean(0), torch.zeros(8), atol=1e-4)
    assert torch.allclose(standardised.var(0), torch.ones(8), atol=1e-3)
    # Scaling a feature vector changes nothing: it is L2-normalised first.
    assert torch.allclose(norm(features * 7), standardised, atol=1e-4)
