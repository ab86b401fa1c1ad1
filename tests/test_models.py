"""Model loading (any open_clip model, local checkpoints, clear errors) and world CLIP training."""

from __future__ import annotations

import time
import warnings

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY_TRAIN, TINY_WORLD
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from conceptlab.artifacts import ArtifactStore
from conceptlab.models import (
    TrainConfig,
    average_prompts,
    class_text_weights,
    clip_variant,
    encode_images,
    load_clip,
    read_checkpoint,
    topk_accuracies,
    train_world_clip,
    world_clip,
)
from conceptlab.world import ConceptWorld


def _has_quick_gelu(model: torch.nn.Module) -> bool:
    return any(isinstance(m, QuickGELU) for m in model.modules())


@pytest.fixture(scope="module")
def vit_b32():
    """A random-weight ViT-B-32 (the real-model path, offline)."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model("ViT-B-32").eval()


def test_local_checkpoint_round_trip_of_a_standard_architecture(vit_b32, tmp_path):
    path = tmp_path / "vit_b32_random.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in vit_b32.state_dict().items()}}, path)
    with pytest.warns(UserWarning, match="ViT-B-32-quickgelu"):  # nothing says which activation
        model, preprocess, tokenizer = load_clip("ViT-B-32", str(path))
    assert not _has_quick_gelu(model)
    for (name, a), b in zip(vit_b32.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(vit_b32.encode_image(x), model.encode_image(x), atol=1e-5)
    assert tokenizer(["a bird"]).shape == (1, 77)
    assert preprocess.transforms[0].size in (224, (224, 224))


def test_deal_release_of_an_openai_architecture_loads_with_quick_gelu(vit_b32, tmp_path, capsys):
    path = tmp_path / "deal_vitb32.pt"
    torch.save({"epoch": 3, "model_state_dict": vit_b32.state_dict(), "optimizer_state_dict": {}, "loss": 0.5}, path)
    model, _, _ = load_clip("ViT-B-32", str(path))
    assert _has_quick_gelu(model) and "ViT-B-32-quickgelu" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(vit_b32.state_dict().values(), model.state_dict().values()))


def _world_vit(quick_gelu: bool = False) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model("ConceptWorld-ViT", force_quick_gelu=quick_gelu).eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, t = torch.rand(2, 3, 64, 64), open_clip.tokenize(["a red bird", "a cat"], context_length=32)
    with torch.no_grad():
        return torch.allclose(a.encode_image(x), b.encode_image(x), atol=1e-5) and torch.allclose(
            a.encode_text(t), b.encode_text(t), atol=1e-5
        )


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "deal", "ddp", "compiled", "safetensors"])
def test_every_checkpoint_wrapping_loads_the_same_weights(wrap, tmp_path):
    original = _world_vit()
    sd = original.state_dict()
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pt")
    if wrap == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(
            {
                "plain": sd,
                "state_dict": {"state_dict": sd, "epoch": 1},
                "deal": {"epoch": 1, "model_state_dict": sd, "optimizer_state_dict": {}, "loss": 0.1},
                "ddp": {f"module.{k}": v for k, v in sd.items()},
                "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},
            }[wrap],
            path,
        )
    model, _, _ = load_clip("ConceptWorld-ViT", str(path), "cpu")
    assert not _has_quick_gelu(model)  # DEAL's format implies QuickGELU only for OpenAI's architectures
    assert _same_outputs(original, model)


def test_openai_torchscript_archive_loads_with_quick_gelu(tmp_path, capsys):
    original = _world_vit(quick_gelu=True)
    path = tmp_path / "openai_release.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(original), path)
    model, _, _ = load_clip("ConceptWorld-ViT", str(path), "cpu")
    assert _has_quick_gelu(model) and "QuickGELU" in capsys.readouterr().err
    assert _same_outputs(original, model)
    assert read_checkpoint(path).form == "TorchScript archive"


def test_openai_keys_in_a_state_dict_mean_quick_gelu(tmp_path):
    path = tmp_path / "openai_sd.pt"
    torch.save(
        {
            **_world_vit().state_dict(),
            "input_resolution": torch.tensor(64),
            "context_length": torch.tensor(32),
            "vocab_size": torch.tensor(49408),
        },
        path,
    )
    ckpt = read_checkpoint(path)
    assert ckpt.quick_gelu is True and "input_resolution" not in ckpt.state
    assert clip_variant("ViT-B-32", ckpt.quick_gelu, ckpt.evidence, "x") == ("ViT-B-32-quickgelu", False)
    assert clip_variant("ConceptWorld-ViT", ckpt.quick_gelu, ckpt.evidence, "x") == ("ConceptWorld-ViT", True)


def test_gelu_weights_named_with_a_quick_gelu_config_are_refused(tmp_path):
    path = tmp_path / "gelu.pt"
    torch.save({"state_dict": {}, "model_cfg": {"quick_gelu": False}}, path)
    assert read_checkpoint(path).quick_gelu is False
    with pytest.raises(ValueError, match="Pass model='ViT-B-32'"):
        load_clip("ViT-B-32-quickgelu", str(path))


def test_unknown_activation_warns_only_where_weights_exist_both_ways():
    with pytest.warns(UserWarning, match="RN50-quickgelu"):
        assert clip_variant("RN50", None, "", "x") == ("RN50", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clip_variant("ConceptWorld-ViT", None, "", "x") == ("ConceptWorld-ViT", False)
    # a plain state dict named with a QuickGELU config may hold GELU weights: said, naming the GELU config
    with pytest.warns(UserWarning, match="model='ViT-B-32'"):
        assert clip_variant("ViT-B-32-quickgelu", None, "", "x") == ("ViT-B-32-quickgelu", False)


def test_pretrained_tag_trained_with_quick_gelu_builds_the_quick_gelu_config(monkeypatch):
    built = []

    def fake_create(arch, pretrained=None, force_quick_gelu=False):
        built.append((arch, pretrained, force_quick_gelu))
        return _world_vit(), None, None

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    load_clip("ViT-B-32", "openai", "cpu")
    load_clip("ViT-B-32", "laion2b_s34b_b79k", "cpu")
    assert built == [("ViT-B-32-quickgelu", "openai", False), ("ViT-B-32", "laion2b_s34b_b79k", False)]


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match="ViT-B-32"):
        load_clip("ViT-B-33")


def test_unknown_pretrained_tag_lists_known_tags():
    with pytest.raises(ValueError, match="openai"):
        load_clip("ViT-B-32", "no-such-tag")


def test_missing_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_clip("ConceptWorld-ViT", str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("content", [b"this is not a checkpoint", "list"])
def test_a_bad_user_file_says_what_is_wrong_and_never_to_rebuild_it(content, tmp_path):
    bad = tmp_path / "mine.pt"
    if content == "list":
        torch.save([torch.zeros(2)], bad)
    else:
        bad.write_bytes(content)
    with pytest.raises(ValueError, match="mine.pt") as err:
        load_clip("ConceptWorld-ViT", str(bad))
    assert "state_dict" in str(err.value) and "rebuild" not in str(err.value).lower()


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(_world_vit().state_dict(), path)
    with pytest.raises(ValueError, match="does not fit.*model name"):
        load_clip("ConceptWorld-RN", str(path))


def test_topk_accuracies_omit_k_at_or_above_the_number_of_classes():
    logits = torch.tensor([[0.9, 0.5, 0.1, 0.0, 0.2], [0.1, 0.2, 0.3, 0.4, 0.9], [0.3, 0.2, 0.1, 0.0, 0.5]])
    labels = [0, 3, 1]
    assert topk_accuracies(logits, labels) == {"top1": pytest.approx(1 / 3)}
    assert topk_accuracies(logits, labels, ks=(1, 2, 3)) == pytest.approx({"top1": 1 / 3, "top2": 2 / 3, "top3": 1.0})
    six = torch.cat([logits, torch.zeros(3, 1)], 1)
    assert set(topk_accuracies(six, labels)) == {"top1", "top5"}


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"steps": 0}, "steps"),
        ({"arch": "ViT-B-32"}, "arch"),
        ({"batch_size": 1024, "n_train": 100}, "batch_size"),
        ({"steps": 300.0}, "steps=300.0 must be an integer, not float"),
        ({"batch_size": True}, "batch_size=True"),
        ({"lr": "fast"}, "lr='fast' must be a number"),
        ({"steps": 20, "warmup": 50}, "warmup=50 exceeds steps=20"),
        ({"warmup": -1}, "warmup=-1 must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"fused_adamw": "yes"}, "fused_adamw='yes' must be True or False"),
    ],
)
def test_bad_training_parameters_say_what_is_wrong(bad, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig(**bad)


def test_training_numbers_of_other_integer_kinds_are_accepted():
    cfg = TrainConfig(steps=np.int64(60), warmup=60, lr=1)
    assert cfg.steps == 60 and cfg.lr == 1


def test_average_prompts_is_the_normalised_mean_per_class():
    prompts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])
    weights = average_prompts(prompts)
    assert torch.allclose(weights, torch.tensor([[0.5**0.5, 0.5**0.5], [0.0, 1.0]]))


def test_history_records_training_seconds_without_evaluation_time(tmp_path):
    world = ConceptWorld(TINY_WORLD)
    cfg = TrainConfig(n_train=64, steps=4, batch_size=8, warmup=1)
    modes = []

    def evaluate(model):
        modes.append(model.training)
        time.sleep(1.0)
        return {"top1": 0.25}

    start = time.perf_counter()
    history = train_world_clip(world, cfg, tmp_path, progress=False, evaluate=evaluate, evaluate_every=2)
    wall = time.perf_counter() - start
    assert [h["step"] for h in history if "top1" in h] == [1, 3] and modes == [False, False]
    seconds = [h["seconds"] for h in history]
    assert seconds == sorted(seconds) and seconds[-1] < wall - 1.5  # neither evaluation is counted


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_same_model(tmp_path):
    world = ConceptWorld(TINY_WORLD)
    cfg = TrainConfig(n_train=256, steps=6, batch_size=16, warmup=2)
    straight = train_world_clip(world, cfg, tmp_path / "straight", progress=False)

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_world_clip(world, cfg, tmp_path / "resumed", progress=False, on_step=interrupt)
    assert (tmp_path / "resumed" / "state.pt").exists() and not (tmp_path / "resumed" / "model.pt").exists()
    resumed = train_world_clip(world, cfg, tmp_path / "resumed", progress=False)
    assert [h["step"] for h in resumed] == list(range(6))
    seconds = [h["seconds"] for h in resumed]
    assert seconds == sorted(seconds)  # the resumed run adds to the seconds of the interrupted one
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
    assert calls and all(c[1].steps == 21 for c in calls)  # the store retries a failed build once


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


def test_image_embeddings_do_not_depend_on_the_batch_size(tiny_clip, tiny_world):
    """encode_images batches by 64 for speed: the embeddings are bitwise those of batches of 256 (features
    cached before the change stay valid), and an image alone gets its embedding up to rounding."""
    from conceptlab.dncbm import embed_images
    from conceptlab.models import encode_images

    images = tiny_world.sample(300, "test").images
    assert torch.equal(encode_images(tiny_clip[0], images, batch_size=256), encode_images(tiny_clip[0], images))
    assert torch.equal(embed_images(tiny_clip[0], images, batch_size=256), embed_images(tiny_clip[0], images))
    alone = torch.cat([encode_images(tiny_clip[0], images[i : i + 1]) for i in range(0, 300, 50)])
    torch.testing.assert_close(encode_images(tiny_clip[0], images)[::50], alone, rtol=1e-5, atol=1e-6)
