"""Model loading (any open_clip model, local checkpoints, clear errors) and world CLIP training."""

from __future__ import annotations

import open_clip
import pytest
import torch
from conftest import TINY_TRAIN, TINY_WORLD

from conceptlab.artifacts import ArtifactStore
from conceptlab.models import (
    TrainConfig,
    class_text_weights,
    encode_images,
    load_clip,
    train_world_clip,
    world_clip,
)
from conceptlab.world import ConceptWorld


@pytest.fixture(scope="module")
def vit_b32_checkpoint(tmp_path_factory):
    """A random-weight ViT-B-32 saved as a local checkpoint (the real-model path, offline)."""
    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-32")
    path = tmp_path_factory.mktemp("ckpt") / "vit_b32_random.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return model, path


def test_local_checkpoint_round_trip_of_a_standard_architecture(vit_b32_checkpoint):
    original, path = vit_b32_checkpoint
    model, preprocess, tokenizer = load_clip("ViT-B-32", str(path))
    for (name, a), b in zip(original.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(original.eval().encode_image(x), model.encode_image(x), atol=1e-5)
    assert tokenizer(["a bird"]).shape == (1, 77)
    assert preprocess.transforms[0].size in (224, (224, 224))


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match="ViT-B-32"):
        load_clip("ViT-B-33")


def test_unknown_pretrained_tag_lists_known_tags():
    with pytest.raises(ValueError, match="openai"):
        load_clip("ViT-B-32", "no-such-tag")


def test_missing_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_clip("ConceptWorld-ViT", str(tmp_path / "missing.pt"))


def test_corrupt_checkpoint_says_delete_and_rebuild(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_clip("ConceptWorld-ViT", str(bad))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(open_clip.create_model("ConceptWorld-ViT").state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        load_clip("ConceptWorld-RN", str(path))


@pytest.mark.parametrize("bad, word", [({"steps": 0}, "steps"), ({"arch": "ViT-B-32"}, "arch"),
                                       ({"batch_size": 1024, "n_train": 100}, "batch_size")])
def test_bad_training_parameters_say_what_is_wrong(bad, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig(**bad)


def test_interrupted_training_resumes_to_the_same_model(tmp_path):
    world = ConceptWorld(TINY_WORLD)
    cfg = TrainConfig(n_train=256, steps=6, batch_size=16, warmup=2, checkpoint_every=2)
    straight = train_world_clip(world, cfg, tmp_path / "straight", progress=False)

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_world_clip(world, cfg, tmp_path / "resumed", progress=False, on_step=interrupt)
    assert (tmp_path / "resumed" / "state.pt").exists() and not (tmp_path / "resumed" / "model.pt").exists()
    resumed = train_world_clip(world, cfg, tmp_path / "resumed", progress=False)
    assert [h["step"] for h in resumed] == list(range(6))
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight], rel=1e-4)
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not (tmp_path / "resumed" / "state.pt").exists()


def test_training_lowers_the_loss(tiny_clip):
    history = tiny_clip[3]
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < first


def test_stored_model_is_reused_only_for_the_same_parameters(tiny_store, tiny_clip, monkeypatch):
    calls = []
    monkeypatch.setattr("conceptlab.models.train_world_clip", lambda *a, **k: calls.append(a))
    model, _, _, history = world_clip(tiny_store, TINY_WORLD, TINY_TRAIN, progress=False)
    assert calls == [] and history == tiny_clip[3]
    with pytest.raises(FileNotFoundError):  # other parameters: it would train (stubbed out here)
        world_clip(tiny_store, TINY_WORLD, TrainConfig(n_train=512, steps=21, batch_size=32, warmup=5))
    assert len(calls) == 1


def test_zero_shot_pipeline_shapes(tiny_clip, tiny_world):
    model, _, tokenizer, _ = tiny_clip
    batch = tiny_world.sample(10, "test")
    feats = encode_images(model, batch.images)
    weights = class_text_weights(model, tokenizer, tiny_world.class_names)
    assert feats.shape == (10, 128) and weights.shape == (6, 128)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(10), atol=1e-5)


def test_store_keeps_parameters_beside_the_model(tiny_store, tiny_clip):
    dirs = list((tiny_store.root / "world_clip").iterdir())
    assert any((d / "model.pt").exists() and (d / "params.json").exists() for d in dirs)
    assert isinstance(tiny_store, ArtifactStore)
