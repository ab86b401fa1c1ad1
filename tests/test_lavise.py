"""LaViSE: concept masks, the CSMR loss, the explainer, filter explanation, dissection and recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conceptlab import lavise
from conceptlab.artifacts import ArtifactStore
from conceptlab.cnn import CNNInput, world_resnet18
from conceptlab.world import ATTRIBUTES, HABITATS, PARTS


@pytest.fixture(scope="module")
def batch(tiny_world):
    return tiny_world.sample(48, split="test")


@pytest.fixture(scope="module")
def concepts(tiny_world):
    return lavise.world_concepts(tiny_world)


def test_concept_masks_match_the_world_ground_truth(tiny_world, batch, concepts):
    names = [c.name for c in concepts]
    masks = lavise.concept_masks(batch, concepts, tiny_world.class_names)
    assert masks.shape == (len(batch), len(concepts), *batch.masks.shape[-2:])
    for p, part in enumerate(PARTS):
        assert (masks[:, names.index(part)] == batch.masks[:, p]).all()
    red = ATTRIBUTES["colour"].index("red")
    expected_red = (batch.masks & (batch.attributes[:, :, 0] == red)[..., None, None]).any(1)
    assert (masks[:, names.index("red")] == expected_red).all()
    striped_head = batch.masks[:, PARTS.index("head")] & (
        batch.attributes[:, PARTS.index("head"), 1] == ATTRIBUTES["pattern"].index("striped"))[:, None, None]
    assert (masks[:, names.index("striped head")] == striped_head).all()
    creature = batch.masks.any(1)
    for i in range(len(batch)):
        habitat = masks[i, names.index(HABITATS[batch.habitats[i]])]
        assert (habitat == ~creature[i]).all()
        cls = tiny_world.class_names[batch.labels[i]]
        assert (masks[i, names.index(cls)] == creature[i]).all()
        other = [c for c in tiny_world.class_names if c != cls]
        assert not masks[i, [names.index(c) for c in other]].any()


def test_split_seen_is_stratified_and_seeded(concepts):
    seen = lavise.split_seen(concepts, 0.5, seed=1)
    groups = np.array([c.group for c in concepts])
    for g in set(groups):
        n = (groups == g).sum()
        assert seen[groups == g].sum() == min(n, max(1, round(0.5 * n)))
    assert (seen == lavise.split_seen(concepts, 0.5, seed=1)).all()
    assert (seen != lavise.split_seen(concepts, 0.5, seed=2)).any()
    with pytest.raises(ValueError, match="annotation_rate"):
        lavise.split_seen(concepts, 0.0)


def test_csmr_loss_by_hand():
    words = torch.eye(3)
    pred = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    target = torch.tensor([0, 2])
    # row 0: cos to target 1, others 0 -> hinge max(0, 1 - 1 + 0) = 0 for both wrong words
    # row 1: cos (0.707, 0.707, 0); target 2 -> wrong words give 1 - 0 + 0.707 each
    expected = (0 + 2 * (1 + 2 ** -0.5)) / 2
    assert lavise.csmr_loss(pred, target, words).item() == pytest.approx(expected, rel=1e-5)


def test_explainer_learns_separable_concepts_and_never_sees_unseen_ones():
    gen = torch.Generator().manual_seed(0)
    k, d = 6, 16
    centres = torch.randn(k, d, generator=gen) * 3
    y = torch.randint(0, k, (600,), generator=gen)
    x = centres[y] + torch.randn(600, d, generator=gen)
    words = F.normalize(torch.randn(k, 8, generator=gen), dim=-1)
    seen = np.array([True] * 4 + [False] * 2)
    with pytest.raises(ValueError, match="unseen"):
        lavise.train_explainer(x, y, words, seen, lavise.ExplainerConfig(epochs=1), progress=False)
    keep = torch.from_numpy(seen)[y]
    head, history = lavise.train_explainer(x[keep], y[keep], words, seen, lavise.ExplainerConfig(epochs=15),
                                           progress=False)
    assert history[-1]["val_top1"] > 0.8  # chance is 0.25
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    with torch.no_grad():
        pred = F.normalize(head(x[keep][:50]), dim=-1) @ words.T
    assert (pred.argmax(1) == y[keep][:50]).float().mean() > 0.8


def test_recall_at_k_by_hand():
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3]])
    gt = np.array([[True, False, True, False], [False, False, False, False]])
    everything = np.ones(4, dtype=bool)
    assert lavise.recall_at_k(scores, gt, everything, 1) == pytest.approx(0.5)  # pair 2 has no ground truth
    assert lavise.recall_at_k(scores, gt, everything, 3) == pytest.approx(1.0)
    assert lavise.recall_at_k(scores, gt, np.array([False, False, True, False]), 2) == pytest.approx(0.0)
    assert np.isnan(lavise.recall_at_k(scores, gt, np.array([False, True, False, True]), 2))


def _planted_features(batch, part: str) -> torch.Tensor:
    """Target-layer maps whose filter 0 fires on ``part`` and the rest is noise."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.from_numpy(batch.masks[:, PARTS.index(part)]).float()[:, None]
    feats = torch.rand(len(batch), 8, 8, 8, generator=gen) * 0.2
    feats[:, :1] = F.adaptive_avg_pool2d(mask, (8, 8)) * 3
    return feats


def test_dissection_and_ground_truth_find_a_planted_filter(tiny_world, batch, concepts):
    names = [c.name for c in concepts]
    features = _planted_features(batch, "body")
    thresholds = lavise.activation_thresholds(features, 0.9)
    iou = lavise.dissect(features, batch, concepts, tiny_world.class_names, thresholds, progress=False)
    assert iou.shape == (8, len(concepts))
    assert names[iou[0].argmax()] == "body"
    assert iou[0].max() > 0.3 and iou[1:].max() < iou[0].max()
    head = lavise.ExplainerHead(8, 4).eval()
    expl = lavise.explain_filters(features, batch, concepts, tiny_world.class_names, head, torch.eye(len(concepts), 4),
                                  act_q=0.9, n_top=4, iou_threshold=0.3, iou_size=32, progress=False)
    assert expl.ground_truth[list(expl.filters).index(0), :, names.index("body")].all()
    assert expl.scores.shape == (len(expl.filters), 4, len(concepts))


def test_concept_examples_pool_masked_features(tiny_world, concepts):
    model = world_resnet18(len(tiny_world.class_names))
    extractor = lavise.feature_extractor(model, "layer3")
    seen = lavise.split_seen(concepts, 0.5)
    to_input = CNNInput(tiny_world.config.resolution)
    x, y = lavise.concept_examples(extractor, to_input, tiny_world, 8, concepts, seen, min_pixels=8, progress=False)
    assert seen[y.numpy()].all() and x.shape == (len(y), 256)
    batch = tiny_world.sample(1, split="train")
    with torch.no_grad():
        feats = extractor(to_input(batch.images))["features"]
    masks = torch.from_numpy(lavise.concept_masks(batch, concepts, tiny_world.class_names))
    first = int(y[0])
    manual = (feats * F.adaptive_avg_pool2d(masks[:, [first]].float(), feats.shape[-2:])).mean((-1, -2))[0]
    assert torch.allclose(x[0], manual, atol=1e-5)
    with pytest.raises(ValueError, match="target_layer"):
        lavise.feature_extractor(model, "layer9")


def test_glove_embeddings(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("red 1 0 0\nhead 0 1 0\nwings 0 0 1\n")
    words = lavise.embed_concepts(["red", "red head", "wings"], f"glove:{path}")
    assert torch.allclose(words[1], F.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0))
    with pytest.raises(ValueError, match="tail"):
        lavise.embed_concepts(["tail"], f"glove:{path}")
    with pytest.raises(FileNotFoundError):
        lavise.embed_concepts(["red"], f"glove:{tmp_path / 'missing.txt'}")
    with pytest.raises(ValueError, match="embedding="):
        lavise.embed_concepts(["red"], "word2vec")


def test_sentence_transformers_is_optional():
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="sentence-transformers"):
            lavise.embed_concepts(["red"], "sentence-transformers:all-MiniLM-L6-v2")
    else:
        pytest.skip("sentence-transformers is installed")


def test_stored_explainer_is_reused(tmp_path):
    store = ArtifactStore(tmp_path)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    words, seen = torch.eye(3), np.ones(3, dtype=bool)
    calls = []

    def pairs():
        calls.append(1)
        return x, y

    cfg = lavise.ExplainerConfig(epochs=2)
    first, _ = lavise.stored_explainer(store, {"cnn": "test"}, pairs, words, seen, cfg, progress=False)
    second, _ = lavise.stored_explainer(store, {"cnn": "test"}, pairs, words, seen, cfg, progress=False)
    assert len(calls) == 1
    assert torch.equal(first(x[:4]), second(x[:4]))
    lavise.stored_explainer(store, {"cnn": "other"}, pairs, words, seen, cfg, progress=False)
    assert len(calls) == 2
