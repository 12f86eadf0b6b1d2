import torch

from sslbackdoor.models.encoders import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    STL10_MEAN,
    STL10_STD,
    build_encoder,
    encoder_names,
)


def test_resnet18_stl10_is_the_cifar_network_with_stl10_normalisation() -> None:
    cifar, stl10 = build_encoder("resnet18-cifar"), build_encoder("resnet18-stl10")
    assert stl10.mean.flatten().tolist() == torch.tensor(STL10_MEAN).tolist()
    assert stl10.std.flatten().tolist() == torch.tensor(STL10_STD).tolist()
    assert cifar.mean.flatten().tolist() == torch.tensor(CIFAR10_MEAN).tolist()
    assert cifar.std.flatten().tolist() == torch.tensor(CIFAR10_STD).tolist()
    assert {k: v.shape for k, v in stl10.state_dict().items()} == \
        {k: v.shape for k, v in cifar.state_dict().items()}
    assert "resnet18-stl10" in encoder_names()
