"""Target CNNs of the LaViSE chapter: the world ResNet-18 and torchvision models from local weights."""

from __future__ import annotations

import pytest
import torch
import torchvision

from conceptlab import lavise
from conceptlab.artifacts import ArtifactStore
from conceptlab.cnn import CNNConfig, load_torchvision_cnn, randomised_copy, world_cnn
from conceptlab.world import WorldConfig

TINY_CNN = CNNConfig(n_train=64, steps=3, batch_size=16)


@pytest.mark.slow
def test_world_cnn_is_seeded_stored_and_reused(tmp_path):
    world_cfg = WorldConfig(n_classes=4)
    a, to_input, history = world_cnn(ArtifactStore(tmp_path / "a"), world_cfg, TINY_CNN, "cpu", progress=False)
    b, _, _ = world_cnn(ArtifactStore(tmp_path / "b"), world_cfg, TINY_CNN, progress=False)
    assert len(history) == 3
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    model_file = next((tmp_path / "a").rglob("model.pt"))
    stamp = model_file.stat().st_mtime_ns
    world_cnn(ArtifactStore(tmp_path / "a"), world_cfg, TINY_CNN, progress=False)
    assert model_file.stat().st_mtime_ns == stamp  # loaded, not retrained
    assert not list((tmp_path / "a").rglob("state.pt"))  # the resume checkpoint is removed when done
    x = to_input(torch.zeros(2, 64, 64, 3, dtype=torch.uint8).numpy())
    assert a(x).shape == (2, 4)
    assert lavise.feature_extractor(a, "layer3")(x)["features"].shape == (2, 256, 8, 8)


def test_randomised_copy_changes_weights_only():
    model = torchvision.models.resnet18(num_classes=3)
    copy = randomised_copy(model, seed=1)
    assert not torch.equal(model.conv1.weight, copy.conv1.weight)
    assert torch.equal(randomised_copy(model, seed=1).conv1.weight, copy.conv1.weight)


def test_torchvision_cnn_from_a_local_state_dict(tmp_path):
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=5).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(original.state_dict(), path)
    model, to_input = load_torchvision_cnn("resnet18", path, input_size=64)
    images = (torch.rand(2, 48, 48, 3) * 255).to(torch.uint8).numpy()
    x = to_input(images)
    assert x.shape == (2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), original(x), atol=1e-5)
    assert lavise.feature_extractor(model, "layer4")(x)["features"].shape == (2, 512, 2, 2)
    with pytest.raises(ValueError, match="torchvision"):
        load_torchvision_cnn("resnet19", path)
    with pytest.raises(ValueError, match="target_weights"):
        load_torchvision_cnn("resnet18", None)
    with pytest.raises(FileNotFoundError):
        load_torchvision_cnn("resnet18", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_torchvision_cnn("alexnet", path)
