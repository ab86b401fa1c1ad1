"""DEAL: losses and metrics on known inputs, training (gradients, frozen text, resume) and the real-model path."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_explain import saved_checkpoint

from conceptlab import deal
from conceptlab.chapters import deal as deal_chapter
from conceptlab.data import load_eval_set
from conceptlab.deal import DealConfig, DealObjective, array_batches, evaluate, train_deal
from conceptlab.descriptors import concept_text, descriptor_text_features, get_descriptors, oracle_descriptors
from conceptlab.explain import minmax
from conceptlab.metrics import (
    blur,
    consistency_loss,
    disentanglability,
    energy_in_mask,
    insertion_fidelity,
    insertion_images,
    mask_maps,
    overlap_agreement,
    pairing_rows,
    pointing_game,
    separation_loss,
    shuffled_pixels,
    sparsity_loss,
)
from conceptlab.models import images_to_tensor, load_clip


# ---------------------------------------------------------------------------- losses and metrics
def test_losses_against_loops():
    maps = torch.rand(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    sep = np.mean(
        [sum((maps[n, i] * maps[n, j]).sum().item() for i in range(4) for j in range(i + 1, 4)) for n in range(3)]
    )
    assert separation_loss(maps).item() == pytest.approx(sep, rel=1e-5)
    con = np.mean([((maps[n, :3].sum(0) - maps[n, 3]) ** 2).sum().item() for n in range(3)])
    assert consistency_loss(maps[:, :3], maps[:, 3]).item() == pytest.approx(con, rel=1e-5)


def test_sparsity_loss_as_coded_on_a_hand_computed_example():
    """An image's K raw maps share one min and max; the sum runs over the batch (no mean)."""
    raw = torch.tensor(
        [
            [[[0.0, 2.0]], [[4.0, 0.0]]],  # image 0: joint max 4 -> 0.5 + 1 = 1.5
            [[[1.0, 1.0]], [[1.0, 3.0]]],
        ]
    )  # image 1: joint min 1, max 3 -> 1
    assert sparsity_loss(raw).item() == pytest.approx(2.5, abs=1e-6)
    assert minmax(raw).sum().item() == pytest.approx(3.0, abs=1e-6)  # map by map: another number


def test_disentanglability_formula():
    assert disentanglability([20.0]) == pytest.approx(0.5)
    assert disentanglability([0.0, 20.0]) == pytest.approx(1 / (1 + math.exp(-1)))
    assert disentanglability([5.0]) > disentanglability([50.0])


def test_insertion_whole_pixels_and_original_indexing():
    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, :2] = 1.0  # the top two rows rank first: 25 % of the pixels
    steps = insertion_images(images, maps, steps=4)
    changed = (steps[0, 0, 0] == images[0]).all(0)  # pixels equal to the original after step 1
    assert changed[:2].all() and changed.float().mean() == pytest.approx(0.25, abs=0.05)
    torch.testing.assert_close(steps[0, 0, -1], images[0])  # the last step is the full image
    quirk = insertion_images(images, maps, steps=4, original_indexing=True)
    torch.testing.assert_close(quirk[0, 0, -1, 1:], blur(images)[0, 1:])  # channels 1, 2 stay blurred
    assert not torch.equal(quirk[0, 0, -1], images[0])


def test_localizability_prefers_the_right_region():
    """A toy encoder that sees only the top-left quadrant: a map on that quadrant scores higher."""

    def encode(x):
        return torch.nn.functional.normalize(
            torch.stack([x[:, 0, :4, :4].mean((1, 2)), x[:, 1].mean((1, 2)), torch.ones(len(x))], 1), dim=-1
        )

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 8, 8, generator=gen) * 4 - 2
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.2]]), dim=-1)
    right, wrong = torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)
    right[:, :, :4, :4] = 1
    wrong[:, :, 4:, 4:] = 1
    good, bad = insertion_fidelity(encode, images, right, text), insertion_fidelity(encode, images, wrong, text)
    assert good.shape == (4, 1) and (good >= 0).all() and (good <= 1).all()
    assert good.mean() > bad.mean() + 0.2


def test_ground_truth_map_scores():
    masks = np.zeros((1, 2, 8, 8), dtype=bool)
    masks[0, 0, :4], masks[0, 1, 4:] = True, True
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 0, 1] = 1.0  # inside mask 0
    maps[0, 1, 0, 1] = 1.0  # outside mask 1
    assert pointing_game(maps, masks).tolist() == [[1.0, 0.0]]
    energy = energy_in_mask(maps, masks)
    assert energy[0, 0] > 0.9 and energy[0, 1] < 0.1
    empty = np.zeros_like(masks)
    assert torch.isnan(pointing_game(maps, empty)).all() and torch.isnan(energy_in_mask(maps, empty)).all()
    agreement = overlap_agreement(maps, masks)
    assert agreement["mask_overlap"].tolist() == [0.0] and agreement["map_overlap"][0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- training
def _world_batches(tiny_world, model, n=64, batch_size=8):
    data = tiny_world.sample(n, "train")
    return array_batches(data.images, data.labels, batch_size, 0, lambda a: images_to_tensor(a, model))


def test_config_validation():
    with pytest.raises(ValueError, match="lambda_sep=-1"):
        DealConfig(lambda_sep=-1)


def test_objective_gradients_reach_the_vision_tower_through_the_maps(tiny_clip, tiny_world):
    model, _, tokenizer, _ = tiny_clip
    cfg = DealConfig(n_concepts=3)
    objective = DealObjective(model, tokenizer, tiny_world.class_names, oracle_descriptors(tiny_world).descriptors, cfg)
    images, labels = _world_batches(tiny_world, model)(0)
    losses = objective(images, torch.as_tensor(labels))
    assert all(torch.isfinite(v) for v in losses.values()) and losses["separation"] > 0
    model.zero_grad()
    losses["separation"].backward()  # the separation loss depends on the weights only through the maps
    first_block = model.visual.transformer.resblocks[0].attn.in_proj_weight.grad
    assert first_block is not None and first_block.abs().sum() > 0
    model.zero_grad()


def test_objective_on_a_resnet_clip(tiny_world):
    """Grad-CAM maps are differentiable too: the separation loss trains the ResNet trunk."""
    model, _, tokenizer = load_clip("ConceptWorld-RN", None, "cpu")
    objective = DealObjective(
        model, tokenizer, tiny_world.class_names, oracle_descriptors(tiny_world).descriptors, DealConfig(n_concepts=2)
    )
    images, labels = _world_batches(tiny_world, model, n=16, batch_size=4)(0)
    losses = objective(images, torch.as_tensor(labels))
    losses["separation"].backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0  # (random init zeroes each block's last BatchNorm)


def test_train_frozen_text_and_resume(tiny_clip, tiny_world, tmp_path):
    import copy

    base = tiny_clip[0]
    tokenizer, descriptors = tiny_clip[2], oracle_descriptors(tiny_world).descriptors
    cfg = DealConfig(steps=4, batch_size=8, lr=1e-4, n_concepts=3, freeze_text=True)
    straight = copy.deepcopy(base)
    batches = _world_batches(tiny_world, straight)
    history = train_deal(
        straight, tokenizer, tiny_world.class_names, descriptors, batches, cfg, tmp_path / "a", progress=False
    )
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    text_before = dict(base.named_parameters())["text_projection"]
    assert torch.equal(dict(straight.named_parameters())["text_projection"], text_before)  # frozen
    assert not torch.equal(straight.visual.proj, base.visual.proj)  # trained

    def interrupted(step):
        if step == 3:
            raise KeyboardInterrupt
        return batches(step)

    resumed = copy.deepcopy(base)
    with pytest.raises(KeyboardInterrupt):
        train_deal(
            resumed, tokenizer, tiny_world.class_names, descriptors, interrupted, cfg, tmp_path / "b", progress=False
        )
    assert (tmp_path / "b" / "state.pt").exists() and not (tmp_path / "b" / "model.pt").exists()
    again = copy.deepcopy(base)
    history_b = train_deal(
        again, tokenizer, tiny_world.class_names, descriptors, batches, cfg, tmp_path / "b", progress=False
    )
    assert [h["loss"] for h in history_b] == pytest.approx([h["loss"] for h in history], rel=1e-5)
    for (name, p), q in zip(straight.named_parameters(), again.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert json.loads((tmp_path / "b" / "history.json").read_text())[-1]["step"] == 3


def test_shuffled_pixels_keep_each_maps_values_and_overlap_disjoint_maps():
    """Two maps on disjoint pixels do not overlap (separation loss 0); shuffled, they do (the null)."""
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, :2], maps[0, 1, 2:] = 1.0, 1.0
    shuffled = torch.stack([shuffled_pixels(maps, torch.Generator().manual_seed(s)) for s in range(20)])
    assert torch.equal(shuffled.flatten(3).sort(-1).values, maps.flatten(2).sort(-1).values.expand(20, -1, -1, -1))
    assert separation_loss(maps) == 0
    assert np.mean([separation_loss(m).item() for m in shuffled]) == pytest.approx(4.0, abs=1.0)  # 16 px x 1/4


def test_evaluate_on_the_world(tiny_clip, tiny_world):
    model, _, tokenizer, _ = tiny_clip
    batch = tiny_world.sample(12, "test")
    ds = oracle_descriptors(tiny_world)
    masks = ds.first(3).part_masks(tiny_world.class_names, batch.labels, batch.masks)
    metrics, maps, per_image = evaluate(
        model,
        tokenizer,
        images_to_tensor(batch.images, model),
        batch.labels,
        tiny_world.class_names,
        ds,
        n_concepts=3,
        part_masks=masks,
        n_localize=6,
        references=True,
    )
    assert metrics["chance_disentanglability"] != metrics["disentanglability"]
    assert per_image["chance_separation_loss"].shape == (12,)
    assert per_image["chance_localizability"].shape == (6,) and 0 <= metrics["chance_localizability"] <= 1
    # the truth: the part masks as maps, through the same conversion
    truth = mask_maps(masks, (8, 8))
    assert metrics["truth_disentanglability"] == pytest.approx(
        disentanglability([separation_loss(truth[i : i + 1]).item() for i in range(12)])
    )
    assert per_image["truth_localizability"].shape == (6,) and 0 <= metrics["truth_localizability"] <= 1
    assert maps.shape == (12, 3, 8, 8)
    for key in ("disentanglability", "localizability", "top1", "pointing_game", "energy_in_mask"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["disentanglability"] == pytest.approx(
        disentanglability([separation_loss(maps[i : i + 1]).item() for i in range(12)])
    )


# ---------------------------------------------------------------------------- real path
@pytest.mark.slow
def test_real_path_local_checkpoint_imagefolder_and_descriptor_file(tmp_path_factory, tmp_path):
    """ViT-B-32 from a local checkpoint, a tiny ImageFolder and a descriptor JSON: evaluate and fine-tune."""
    rng = np.random.default_rng(0)
    for cls in ("Black_Footed_Albatross", "Cardinal"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{i}.jpg")
    (tmp_path / "desc.json").write_text(
        json.dumps(
            {
                "black footed albatross": ["long narrow wings", "dark brown body", "pale beak", "webbed feet"],
                "cardinal": ["bright red feathers", "pointed crest", "black face mask", "thick orange beak"],
            }
        )
    )
    model, preprocess, tokenizer = load_clip("ViT-B-32", str(saved_checkpoint(tmp_path_factory, "ViT-B-32")), "cpu")
    test = load_eval_set(model, preprocess, 4, "imagefolder", str(tmp_path / "data"))
    assert test.class_names == ["black footed albatross", "cardinal"] and test.display.shape == (4, 224, 224, 3)
    ds = get_descriptors(str(tmp_path / "desc.json"), test.class_names, None)
    one_each = [0, 2]
    metrics, maps, _ = evaluate(
        model, tokenizer, test.images[one_each], test.labels[one_each], test.class_names, ds, n_concepts=2
    )
    assert maps.shape == (2, 2, 7, 7) and 0 <= metrics["localizability"] <= 1 and "pointing_game" not in metrics
    cfg = DealConfig(steps=1, batch_size=2, lr=1e-6, n_concepts=2, freeze_text=True)
    history = train_deal(
        model,
        tokenizer,
        test.class_names,
        ds.descriptors,
        array_batches(test.images, test.labels, 2, 0),
        cfg,
        tmp_path / "deal",
        progress=False,
    )
    assert np.isfinite(history[0]["loss"]) and (tmp_path / "deal" / "model.pt").exists()


def test_deal_clip_is_stored_and_reused(tiny_clip, tiny_world, tiny_store, monkeypatch):
    import conceptlab.deal as deal

    model, _, tokenizer, _ = tiny_clip
    descriptors = oracle_descriptors(tiny_world).descriptors
    cfg = DealConfig(steps=2, batch_size=4, lr=1e-4, n_concepts=2)
    batches = _world_batches(tiny_world, model, n=16, batch_size=4)
    tuned, history = deal.deal_clip(
        tiny_store, {"test": 1}, model, tokenizer, tiny_world.class_names, descriptors, batches, cfg, progress=False
    )
    assert not torch.equal(tuned.visual.proj, model.visual.proj)  # a trained copy; the base is untouched
    monkeypatch.setattr(deal, "train_deal", lambda *a, **k: pytest.fail("retrained a stored run"))
    again, history_again = deal.deal_clip(
        tiny_store, {"test": 1}, model, tokenizer, tiny_world.class_names, descriptors, batches, cfg, progress=False
    )
    assert history_again == history and torch.equal(again.visual.proj, tuned.visual.proj)


# ---------------------------------------------------------------------------- fidelity switches
def _visual_grads(model, loss):
    params = [p for p in model.visual.parameters() if p.requires_grad]
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("arch", ["world-vit", "ConceptWorld-RN"])
def test_detach_maps_silences_the_map_losses_only(tiny_clip, tiny_world, arch):
    """detach_maps=True (the original code): L_sep, L_con, L_spa give exactly zero gradient to the vision
    tower, while L_ctr still trains it; without the switch, L_sep's gradient is not zero."""
    model, tokenizer = (tiny_clip[0], tiny_clip[2]) if arch == "world-vit" else load_clip(arch, None, "cpu")[::2]
    images, labels = _world_batches(tiny_world, model, n=16, batch_size=4)(0)
    descriptors = oracle_descriptors(tiny_world).descriptors
    norms = {}
    for detach in (False, True):
        objective = DealObjective(
            model, tokenizer, tiny_world.class_names, descriptors, DealConfig(n_concepts=2, detach_maps=detach)
        )
        losses = objective(images, torch.as_tensor(labels))
        norms[detach] = {
            k: sum(g.abs().sum().item() for g in _visual_grads(model, losses[k]))
            for k in ("separation", "consistency", "sparsity", "contrastive")
        }
    assert norms[True]["separation"] == norms[True]["consistency"] == norms[True]["sparsity"] == 0.0
    assert norms[False]["separation"] > 0 and norms[True]["contrastive"] > 0


def test_concept_text_bare_is_the_default_and_differs_from_the_sentence(tiny_clip, tiny_world):
    model, _, tokenizer, _ = tiny_clip
    ds = oracle_descriptors(tiny_world)
    cls, first = tiny_world.class_names[0], ds.descriptors[tiny_world.class_names[0]][0]
    assert concept_text(cls, first) == first and concept_text(cls, first, "sentence").startswith(f"{cls}, which")
    assert DealConfig().concept_text == "bare" and deal_chapter.PARAMETERS["concept_text"].default == "bare"
    feats = {
        t: descriptor_text_features(model, tokenizer, ds.descriptors, tiny_world.class_names, 3, t)
        for t in ("bare", "sentence")
    }
    assert (feats["bare"] - feats["sentence"]).abs().max() > 1e-3
    tokens = {
        t: DealObjective(
            model, tokenizer, tiny_world.class_names, ds.descriptors, DealConfig(n_concepts=3, concept_text=t)
        ).map_tokens
        for t in ("bare", "sentence")
    }
    assert not torch.equal(tokens["bare"][:, :3], tokens["sentence"][:, :3])
    assert torch.equal(tokens["bare"][:, 3], tokens["sentence"][:, 3])  # the class map: the bare class name


def test_config_defaults_are_the_original_imagenet_run():
    cfg = DealConfig()
    assert (cfg.lambda_sep, cfg.lambda_con, cfg.lambda_spa, cfg.lr, cfg.batch_size, cfg.steps, cfg.eval_mode) == (
        0.1,
        0.01,
        0.0005,
        5e-7,
        256,
        5000,
        True,
    )
    assert DealConfig(steps=0).steps == 0  # evaluate only
    assert deal_chapter.SWITCHES["detach_maps"].paper is False and deal_chapter.SWITCHES["detach_maps"].original is True


def test_localizability_pairings_differ_on_a_constructed_case():
    """Correct, original indexing and original indexing + pairing give three different numbers."""
    assert pairing_rows(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert pairing_rows(3, 2, original_pairing=True).tolist() == [0, 1, 2, 0, 1, 2]  # images.repeat(K)
    assert pairing_rows(3, 2, original_pairing=True, batch=2).tolist() == [0, 1, 0, 1, 2, 2]

    def encode(x):  # sees the mean of channel 1 and the top-left quadrant of channel 0
        return torch.nn.functional.normalize(
            torch.stack([x[:, 0, :4, :4].mean((1, 2)), x[:, 1].mean((1, 2)), torch.ones(len(x))], 1), dim=-1
        )

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 8, 8, generator=gen) * 4 - 2
    images[1::2] = images[1::2].flip(-1)
    maps = torch.zeros(4, 2, 8, 8)
    maps[0::2, :, :4, :4] = 1  # even images: the region the encoder sees
    maps[1::2, :, 4:, 4:] = 1
    texts = torch.nn.functional.normalize(torch.randn(4, 2, 3, generator=gen), dim=-1)
    values = [
        insertion_fidelity(encode, images, maps, texts, original_indexing=i, original_pairing=p).mean().item()
        for i, p in deal.LOCALIZABILITY.values()
    ]
    assert len({round(v, 4) for v in values}) == 3, values


def test_zero_shot_uses_the_bare_class_name_and_top5_needs_more_than_five_classes(tiny_clip, tiny_world, monkeypatch):
    import conceptlab.models as models

    model, _, tokenizer, _ = tiny_clip
    batch = tiny_world.sample(8, "test")
    seen = []
    real = models.class_text_weights
    monkeypatch.setattr(
        models,
        "class_text_weights",
        lambda m, t, names, templates: seen.append(templates) or real(m, t, names, templates),
    )
    metrics, _, _ = evaluate(
        model,
        tokenizer,
        images_to_tensor(batch.images, model),
        batch.labels,
        tiny_world.class_names,
        oracle_descriptors(tiny_world),
        n_concepts=2,
        localizability=(),
    )
    assert seen == [("{}",)] and "top5" in metrics  # 6 classes
    names = tiny_world.class_names[:5]
    keep = batch.labels < 5
    metrics, _, _ = evaluate(
        model,
        tokenizer,
        images_to_tensor(batch.images[keep], model),
        batch.labels[keep],
        names,
        oracle_descriptors(tiny_world),
        n_concepts=2,
        localizability=(),
    )
    assert "top5" not in metrics


def test_fidelity_rows_pair_each_column_with_its_own_variant():
    before = {
        "disentanglability": 0.1,
        "localizability": 0.5,
        "localizability_original_indexing_pairing": 0.4,
        "top1": 0.6,
    }
    book = {
        "disentanglability": 0.2,
        "localizability": 0.7,
        "localizability_original_indexing_pairing": 0.45,
        "top1": 0.65,
    }
    original = {**book, "disentanglability": 0.15, "localizability_original_indexing_pairing": 0.42}
    rows = deal_chapter.fidelity_rows(before, book, original)
    assert rows["localizability"]["this book"] == "0.500 → 0.700"
    assert rows["localizability"]["original code"] == "0.400 → 0.420"
    assert rows["disentanglability"]["original code"] == "0.100 → 0.150"
    assert rows["top1"]["paper"].startswith("0.632 → 0.708")


def test_released_checkpoint_format_is_evaluated(tiny_clip, tmp_path):
    """The original's {"epoch", "model_state_dict", "optimizer_state_dict", "loss"} file loads as the model."""
    from types import SimpleNamespace

    model = tiny_clip[0]
    path = tmp_path / "step_500.pt"
    torch.save(
        {"epoch": 500, "model_state_dict": model.state_dict(), "optimizer_state_dict": {}, "loss": torch.tensor(1.0)},
        path,
    )
    ch = SimpleNamespace(
        params={"model": "world", "deal_checkpoint": str(path)},
        train_cfg=SimpleNamespace(arch="ConceptWorld-ViT"),
        device=torch.device("cpu"),
    )
    loaded = deal_chapter.checkpoint_model(ch)
    assert torch.equal(loaded.visual.proj, model.visual.proj)


def _tiny_chapter(name, parameters, store, tmp_path, **values):
    """A chapter on the session's tiny world and CLIP (the same artifact keys as the fixtures)."""
    from conceptlab import chapter

    namespace = {
        "world": {"n_classes": 6},
        "world_clip": {"n_train": 512, "steps": 20, "batch_size": 32, "warmup": 5},
        "artifacts_dir": str(store.root),
        "results_dir": str(tmp_path),
        **values,
    }
    return chapter.setup(name, namespace, parameters)


def test_exercise_solution_is_computed_by_a_run(tiny_clip, tiny_store, tmp_path):
    ch = _tiny_chapter(
        "03_deal",
        deal_chapter.PARAMETERS,
        tiny_store,
        tmp_path,
        n_train=32,
        n_test=16,
        n_localize=4,
        deal_batch_size=4,
        exercise_steps=2,
    )
    table = ch.exercise("detached maps", deal_chapter.exercise, detach_maps=True)
    from conceptlab.plots import human_label

    assert len(table) == 3 and "detach" in str(table.index[1])  # as in the chapter, changed, change
    assert table.iloc[2][human_label("disentanglability")] != 0  # the changed parameter changes the solution
    assert table.iloc[0][human_label("weight_change")] > 0


def test_scores_are_kept_and_recomputed_only_when_the_model_data_settings_or_code_change(
    tiny_clip, tiny_store, tmp_path, monkeypatch
):
    """A score is read back for the same weights, images and settings (a rerun, an exercise repeating the
    chapter's own model); other weights, another image count, another setting or edited code compute it."""
    ch = _tiny_chapter("03_deal", deal_chapter.PARAMETERS, tiny_store, tmp_path, n_train=8, n_test=11, n_localize=2)
    data = deal_chapter.load_data(ch)
    calls = []
    real = deal_chapter.evaluate
    monkeypatch.setattr(deal_chapter, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    clip = ch.clip()[0]
    first, values = deal_chapter.scores(ch, clip, data, per_image=True)
    assert deal_chapter.scores(ch, clip, data, per_image=True)[0] == first and len(calls) == 1, "read back"
    assert all(np.array_equal(values[k], v) for k, v in deal_chapter.scores(ch, clip, data, per_image=True)[1].items())
    calls.clear()
    deal_chapter.scores(ch, clip, data, n=10)  # other images
    deal_chapter.scores(ch, clip, data, concept_text="sentence")  # another setting
    changed = copy.deepcopy(clip)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    deal_chapter.scores(ch, changed, data)  # other weights
    assert len(calls) == 3
    fingerprint = ch.store.fingerprint
    monkeypatch.setattr(
        ch.store, "fingerprint", lambda path: "edited" if path == deal_chapter.__file__ else fingerprint(path)
    )
    deal_chapter.scores(ch, clip, data)
    assert len(calls) == 4, "a score computed by other code is computed again"


def test_evaluate_only_runs_list_no_training_switch():
    assert "detach_maps" in deal_chapter.switches({"deal_steps": 80})
    evaluation_only = set(deal_chapter.SWITCHES) - set(deal_chapter.TRAINING_SWITCHES)
    assert set(deal_chapter.switches({"deal_steps": 0})) == evaluation_only
    assert "concept_text" in deal_chapter.switches({"deal_steps": 0})


def test_evaluation_only_records_no_training_parameter(tiny_store, tmp_path):
    """deal_steps 0 evaluates only: no training setting is recorded as applied."""
    ch = _tiny_chapter("03_deal", deal_chapter.PARAMETERS, tiny_store, tmp_path, deal_steps=0)
    applied = ch.applied()
    assert "deal_steps" in applied and "concept_text" in applied
    assert not {"lambda_sep", "deal_lr", "deal_batch_size", "detach_maps", "deal_seeds", "n_train"} & set(applied)
    assert "lambda_sep" in ch.with_params(deal_steps=5).applied()


def _folders(root, classes):
    for c in classes:
        (root / c).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (32, 32), (40 * j, 90, 160)).save(root / c / f"{j}.png")
    return root


def test_train_root_with_another_class_stops_before_training(tmp_path):
    """The chapter path checks the training folder's classes before any model is loaded or trained."""
    from conceptlab import chapters

    test = _folders(tmp_path / "test", ["cat", "dog"])
    train = _folders(tmp_path / "train", ["cat", "dog", "extra"])
    (tmp_path / "d.json").write_text(json.dumps({c: [f"{c} part {k}" for k in range(6)] for c in ("cat", "dog")}))
    ch = chapters.start(
        "03_deal",
        {
            "model": "ConceptWorld-ViT",
            "dataset": "imagefolder",
            "data_root": str(test),
            "train_root": str(train),
            "descriptors": str(tmp_path / "d.json"),
            "artifacts_dir": str(tmp_path / "a"),
            "results_dir": str(tmp_path / "r"),
        },
    )
    with pytest.raises(ValueError, match="only in train_root.*extra"):
        deal_chapter.load_data(ch)
    assert ch._clip is None  # stopped before loading the model


def test_breakdown_splits_the_change_into_loss_terms():
    """whole = L_ctr + (L_con + L_spa) + L_sep, each over seeds, from constructed per-seed scores."""
    from types import SimpleNamespace

    clip = {"bare": {"disentanglability": 0.5, "top1": 0.9}}
    seeds = {
        deal_chapter.DETACHED_RUN: [{"disentanglability": 0.52, "top1": 0.88}] * 3,
        deal_chapter.NO_SEP_RUN: [{"disentanglability": v, "top1": 0.87} for v in (0.61, 0.62, 0.63)],
        deal_chapter.PAPER_RUN: [{"disentanglability": v, "top1": 0.86} for v in (0.63, 0.65, 0.67)],
    }
    r = deal_chapter.Result(evals={"CLIP": clip}, seeds=seeds)
    parts = deal_chapter.breakdown(SimpleNamespace(params={"concept_text": "bare"}), r)
    d = parts["disentanglability"]
    assert d["whole change"]["mean"] == pytest.approx(0.15)
    assert d["L_ctr (rich labels)"]["mean"] == pytest.approx(0.02)
    assert d["L_con + L_spa"]["mean"] == pytest.approx(0.10)
    assert d["L_sep"]["mean"] == pytest.approx(0.03)
    assert d["L_sep"]["low"] < 0.03 < d["L_sep"]["high"]
    assert parts["top1"]["whole change"]["high"] < 0  # a drop outside its interval


@pytest.mark.notebook
def test_chapter_scores_maps_against_null_maps_and_runs_the_original_training(run_smoke):
    """Disentanglability and localizability carry a chance level (null maps through the same conversion),
    in the results, the headline and a generated summary sentence; the original training is a literal run."""
    record = json.loads((run_smoke("03_deal") / "results" / "03_deal.json").read_text())
    chance = record["results"]["chance"]
    references = record["results"]["map_references"]
    for m in ("disentanglability", "localizability"):
        assert 0 <= chance[m] <= 1
        assert references[m]["chance_low"] <= chance[m] <= references[m]["chance_high"]
        assert 0 <= references[m]["truth"] <= 1, "the part masks through the same conversion (the ceiling)"
        assert record["headline"][f"{m}, CLIP"]["chance"] == chance[m]
        assert "chance:" in record["headline"][f"{m}, CLIP"]["note"]
    assert any(line.startswith("Against chance") for line in record["summary"])
    assert "deal_original_training" in record["results"]["scores"], "the per-image contrastive run is a literal run"
    p, grid = record["parameters"], record["results"]["ablation"]
    assert len(p["deal_seeds"]) > 1, "the smoke set trains the grid with several seeds"
    for l_sep in p["ablation_lambda_sep"]:
        seeds = [a["seed"] for a in grid if a["lambda_sep"] == l_sep]
        assert sorted(seeds) == sorted(p["deal_seeds"]), "each grid point is trained with every seed"


def test_ablation_table_gives_each_grid_point_its_mean_and_interval_over_seeds():
    from conceptlab.stats import seed_interval

    rows = [
        {"lambda_sep": lam, "lambda_con": 0.01, "seed": s, "top1": v}
        for lam, values in ((0.0, [0.90, 0.92, 0.91]), (0.1, [0.80, 0.86, 0.83]))
        for s, v in enumerate(values)
    ]
    table = deal_chapter.ablation_table(rows, metrics=("top1", "pointing_game"))
    assert list(table.index) == [(0.0, 0.01), (0.1, 0.01)] and "pointing_game" not in table
    mean, low, high = seed_interval([0.80, 0.86, 0.83])
    assert low < mean < high and table.loc[(0.1, 0.01), "seeds"] == 3
    assert table.loc[(0.1, 0.01), "top1"] == f"{mean:.3f} [{low:.3f}, {high:.3f}]"
    assert table.loc[(0.0, 0.01), "top1"].startswith("0.910 [")


def test_switch_steps_change_one_switch_at_a_time_up_to_the_original_training():
    """Each column is a literal run: detaching the maps, then the per-image contrastive loss, then the
    original localizability on that same run; without the per-image run its column is absent."""
    scores = lambda d, loc: {"disentanglability": d, "localizability": loc, "top1": 0.9}  # noqa: E731
    evals = {
        "CLIP": {"bare": {**scores(0.5, 0.7), "localizability_original_indexing_pairing": 0.5}},
        deal_chapter.PAPER_RUN: {"bare": scores(0.8, 0.75)},
        deal_chapter.DETACHED_RUN: {"bare": {**scores(0.6, 0.72), "localizability_original_indexing_pairing": 0.52}},
    }
    without = deal_chapter.switch_steps(deal_chapter.Result(evals=evals), "bare")
    assert "+ per-image contrastive" not in without.columns
    assert without.loc["localizability"].iloc[-1] == "0.500 → 0.520"
    evals[deal_chapter.ORIGINAL_RUN] = {"bare": {**scores(0.55, 0.71), "localizability_original_indexing_pairing": 0.6}}
    table = deal_chapter.switch_steps(deal_chapter.Result(evals=evals), "bare")
    assert list(table.loc["disentanglability"]) == ["0.500 → 0.800", "0.500 → 0.600", "0.500 → 0.550", "0.500 → 0.550"]
    assert table.loc["localizability"].iloc[-1] == "0.500 → 0.600", "the original localizability of the last run"
    assert deal_chapter.original_run(deal_chapter.Result(evals=evals)) == deal_chapter.ORIGINAL_RUN


def test_reference_sentence_places_each_model_against_the_chance_band_and_the_truth():
    from conceptlab.chapters.report import Reported

    ref = {"chance": 0.69, "chance_low": 0.66, "chance_high": 0.72, "truth": 0.75}
    clip, deal = Reported(0.79, 0.76, 0.82, chance=0.69), Reported(0.715, 0.70, 0.73, chance=0.69)
    said = deal_chapter.reference_sentence("localizability", ref, [("CLIP", clip), ("DEAL", deal)])
    assert "0.690 [0.660, 0.720]" in said and "part masks as maps reach 0.750" in said
    assert "for CLIP (above chance)" in said and "for DEAL (at chance)" in said, "the band, not the level, decides"
    assert "above the part masks themselves" in said
    below_truth = deal_chapter.reference_sentence("localizability", {**ref, "truth": 0.9}, [("CLIP", clip)])
    assert "above the part masks" not in below_truth


def test_grid_figure_draws_each_measures_chance_and_the_part_masks_score():
    """The λ_sep figure carries the references of what it plots: disentanglability's chance band (null maps)
    and the part masks' score (the ceiling) as drawn lines, the other measures' chance in their titles."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    params = {"concept_text": "bare", "lambda_con": 0.01, "lambda_sep": 0.1, "ablation_steps": 20, "deal_steps": 40}
    scores = lambda d, pg, t: {"disentanglability": d, "pointing_game": pg, "top1": t}  # noqa: E731
    masks = np.zeros((4, 5, 8, 8), dtype=bool)
    masks[:, 0, :2, :2] = True  # one part of 4 pixels in 64: chance 1/16 for the pointing game
    clip = {**scores(0.69, 0.29, 0.93), "chance_disentanglability": 0.795, "truth_disentanglability": 0.873}
    r = deal_chapter.Result(
        data=SimpleNamespace(test=SimpleNamespace(class_names=[f"c{i}" for i in range(16)]), part_masks=masks),
        evals={"CLIP": {"bare": clip}},
        clip_per_image={"chance_separation_loss": np.array([2.0, 4.0, 6.0, 8.0])},
        ablation=[
            {"lambda_sep": lam, "lambda_con": 0.01, "seed": s, **scores(0.78 + lam, 0.3, 0.92)}
            for lam in (0.0, 0.1)
            for s in range(3)
        ],
        seeds={
            deal_chapter.PAPER_RUN: [scores(0.81 + e, 0.32, 0.91) for e in (0.0, 0.01, 0.02)],
            deal_chapter.NO_SEP_RUN: [scores(0.79 + e, 0.30, 0.91) for e in (0.0, 0.01, 0.02)],
        },
    )
    fig = deal_chapter.ablation_figure(SimpleNamespace(params=params), r)
    for ax in fig.axes[:3]:
        assert ax.get_xlabel() == "λ_sep"
    disent, pointing, top1 = fig.axes[0], fig.axes[1], fig.axes[2]
    band = [p for p in disent.patches if isinstance(p, Rectangle) and p.get_label() == "chance band"]
    assert band, "the chance band of disentanglability is drawn"
    low, high = band[0].get_y(), band[0].get_y() + band[0].get_height()
    reference = deal_chapter.map_references(r, "bare")["disentanglability"]
    assert np.isclose(low, reference["chance_low"]) and np.isclose(high, reference["chance_high"])
    assert any(np.allclose(line.get_ydata(), 0.873) for line in disent.lines), "the part masks' score is drawn"
    assert "chance 0.062" in top1.get_title() and "chance 0.062" in pointing.get_title()
    assert "chance" not in disent.get_title(), "a drawn band is not repeated in the title"
    plt.close(fig)
