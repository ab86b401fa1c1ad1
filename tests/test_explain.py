"""Explanation maps: batched computation equals the original's per-image computation, for ViT and ResNet CLIPs."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from conceptlab.explain import explain, explain_with_features, grid_shape, minmax, per_image_reference
from conceptlab.models import encode_texts, images_to_tensor, load_clip


def saved_checkpoint(tmp_path_factory, name: str) -> Path:
    """A random-weight open_clip ``name`` saved as a local checkpoint (made once per test session)."""
    path = tmp_path_factory.getbasetemp() / "checkpoints" / f"{name}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(open_clip.create_model(name).state_dict(), path)
    return path


@pytest.fixture(scope="module", params=["ViT-B-32", "RN50"])
def real_arch(request, tmp_path_factory):
    """(model, tokenizer) of a standard architecture loaded from a local checkpoint, as the real path does."""
    model, _, tokenizer = load_clip(request.param, str(saved_checkpoint(tmp_path_factory, request.param)), "cpu")
    return model, tokenizer


def _inputs(model, tokenizer, n_images=2, texts=("a red head", "blue wings", "a striped tail")):
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(1))
    feats = encode_texts(model, tokenizer, list(texts))
    return images, torch.stack([feats.roll(i, 0) for i in range(n_images)])  # different concepts per image


def _assert_matches_reference(model, images, texts, start_layer=None):
    batched = explain(model, images, texts, start_layer, normalize=False)
    reference = per_image_reference(model, images, texts, start_layer)
    assert batched.shape == (len(images), texts.shape[1], *grid_shape(model))
    assert reference.abs().max() > 0  # a non-trivial map
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=0)
    # each pair alone (one image, one concept) gives the same map as inside the batch
    single = explain(model, images[1:2], texts[1:2, 2:3], start_layer, normalize=False)
    torch.testing.assert_close(single[0, 0], batched[1, 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(minmax(single)[0, 0], minmax(batched)[1, 2], atol=1e-5, rtol=0)


def test_real_architectures_match_per_image_reference(real_arch):
    model, tokenizer = real_arch
    images, texts = _inputs(model, tokenizer)
    _assert_matches_reference(model, images, texts)


@pytest.mark.parametrize("start_layer", [None, 0, -2])
def test_world_vit_matches_reference(tiny_clip, tiny_world, start_layer):
    model, _, tokenizer, _ = tiny_clip
    images = images_to_tensor(tiny_world.sample(4, "test").images, model)
    texts = encode_texts(model, tokenizer, ["a red head", "blue wings", "a striped tail", "a zorbil"])
    _assert_matches_reference(model, images, texts.expand(4, -1, -1), start_layer)


def test_world_resnet_matches_reference(tiny_world):
    model, _, tokenizer = load_clip("ConceptWorld-RN", None, "cpu")
    images = images_to_tensor(tiny_world.sample(3, "test").images, model)
    texts = encode_texts(model, tokenizer, ["a red head", "blue wings", "a striped tail"])
    _assert_matches_reference(model, images, texts.expand(3, -1, -1))


def test_relevance_forward_reproduces_the_image_embedding(tiny_clip, tiny_world):
    """The re-implemented attention gives open_clip's own image embedding."""
    model, _, tokenizer, _ = tiny_clip
    images = images_to_tensor(tiny_world.sample(5, "test").images, model)
    _, features = explain_with_features(model, images, encode_texts(model, tokenizer, ["a head", "a tail"]))
    with torch.no_grad():
        torch.testing.assert_close(features, model.encode_image(images), atol=1e-5, rtol=1e-5)


def test_maps_depend_on_the_concept(tiny_clip, tiny_world):
    model, _, tokenizer, _ = tiny_clip
    images = images_to_tensor(tiny_world.sample(2, "test").images, model)
    maps = explain(model, images, encode_texts(model, tokenizer, ["a red head", "blue wings"]))
    assert maps.min() >= 0 and maps.max() <= 1
    assert (maps[:, 0] - maps[:, 1]).abs().max() > 1e-3


def test_bad_start_layer_and_shapes(tiny_clip, tiny_world):
    model, _, tokenizer, _ = tiny_clip
    images = images_to_tensor(tiny_world.sample(2, "test").images, model)
    texts = encode_texts(model, tokenizer, ["a head"])
    with pytest.raises(ValueError, match="start_layer=9"):
        explain(model, images, texts, start_layer=9)
    with pytest.raises(ValueError, match="text_features must be"):
        explain(model, images, texts.expand(3, -1, -1))


def test_unsupported_vision_tower_is_a_clear_error():
    class Fake(torch.nn.Module):
        visual = torch.nn.Linear(2, 2)

    with pytest.raises(NotImplementedError, match="Cannot explain a Linear"):
        explain(Fake(), torch.zeros(1, 2), torch.zeros(1, 2))
