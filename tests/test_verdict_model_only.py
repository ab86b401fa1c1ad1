"""Chapter 7's model-only tests on a user's model (issue 22): the randomisation cascade, the null band and
the input null of the map explainers on any open_clip CLIP, and chapter 7 on a user's checkpoint and images."""

from __future__ import annotations

import hashlib
import json

import nbformat
import numpy as np
import pytest
import torch
from test_bookrun import _book_file, _stand_ins

from conceptlab import bookrun, chapters
from conceptlab import explainers as xp
from conceptlab import verdict as vd
from conceptlab.models import class_text_weights, images_to_tensor, load_clip
from conceptlab.stats import permutation_band


@pytest.fixture(scope="module")
def sample(tiny_world):
    """A user's CLIP (the stand-ins' architecture, untrained: any open_clip model will do), preprocessed
    images, labels and class text features of 12 world test images."""
    torch.manual_seed(0)
    clip, _, tokenizer = load_clip("ConceptWorld-ViT", None, "cpu")
    batch = tiny_world.sample(12, "test")
    texts = class_text_weights(clip, tokenizer, tiny_world.class_names)
    return clip, images_to_tensor(batch.images, clip), batch.labels, texts


def test_map_similarity_and_its_null_bands_register_what_they_test():
    rng = np.random.default_rng(0)
    maps = rng.random((6, 5, 5))
    assert np.allclose(vd.map_similarity(maps, maps), 1.0) and np.allclose(vd.map_similarity(maps, -maps), -1.0)
    assert np.allclose(vd.map_similarity(maps, np.zeros_like(maps)), 0.0), "a constant map carries no ranking"
    mean, low, high = vd.shuffled_band(maps, 50)
    assert low < 0 < high and abs(mean) < 0.1
    tied = np.round(maps * 3)  # ties: shuffling the ranks must still equal ranking the shuffled maps
    flat = tied.reshape(6, -1)
    rerank = permutation_band(lambda g: float(vd.map_similarity(flat, flat[:, g.permutation(25)]).mean()), 50, seed=3)
    assert np.allclose(vd.shuffled_band(tied, 50, seed=3), rerank, atol=1e-12)
    same = np.repeat(maps[:1], 6, 0)
    assert vd.different_images_band(same, 20)[1] > 0.99, "identical maps of different images: no band below 1"
    assert vd.different_images_band(maps, 50)[2] < 0.6
    value, low, high = vd.mean_interval(np.array([0.1, 0.2, 0.3, 0.4]), 100)
    assert value == pytest.approx(0.25) and low <= value <= high and low < high


@pytest.mark.parametrize("name", list(xp.MODEL_ONLY_MAPS))
def test_the_cascade_on_any_clip_drops_below_self_similarity_and_leaves_the_model_unchanged(name, sample):
    clip, images, labels, texts = sample
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    check = vd.model_only_check(xp.MODEL_ONLY_MAPS[name], clip, images, labels, texts, [1], 50, 50)
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items()), "the user's model was altered"
    ks = check.cascade["stages re-initialised"].tolist()
    assert ks == [0, 1, len(vd.vision_stages(clip))], "the trained model, the cascade, then every stage"
    self_similarity = check.cascade.similarity.iloc[0]
    assert self_similarity > 0.99
    assert check.randomised.similarity < self_similarity - 0.3, "a fully randomised model keeps its maps"
    assert check.randomised.low <= check.randomised.similarity <= check.randomised.high
    assert check.band[1] <= check.band[0] <= check.band[2] and -1 <= check.input_null[0] <= 1
    record = json.loads(json.dumps(check.to_dict()))
    assert record["n_images"] == len(labels) and len(record["cascade"]) == 3


def test_an_explainer_blind_to_the_weights_fails_the_check(sample):
    clip, images, labels, texts = sample
    brightness = lambda model, x, t: x.mean(1).numpy()  # noqa: E731 (reads the image, never the model)
    check = vd.model_only_check(brightness, clip, images, labels, texts, [1], 50, 50)
    assert check.randomised.similarity > 0.99 and not check.follows_the_weights
    assert check.input_null[0] < 0.2, "its maps of noise images are unlike its maps of real images"


def test_bookrun_no_longer_skips_the_verdict_for_a_users_model(tmp_path):
    root = _stand_ins(tmp_path / "mine")
    for blocks, planted in (({}, True), ({"07_verdict": {"planted": False}}, False)):
        (plan,), _ = bookrun.read_book_file(_book_file(root, **blocks), tmp_path / "out", ["07_verdict"])
        assert plan.skip is None, plan.skip
        assert plan.params["data_root"] == str(root / "images") and plan.params.get("planted", True) is planted


@pytest.mark.notebook
def test_chapter_7_runs_on_a_users_checkpoint_and_images(tmp_path, kernel):
    """The notebook through bookrun's plan on the stand-in user files, at tiny sizes, with ``planted: false``;
    then ``run`` on the same parameters writes the same results."""
    root = _stand_ins(tmp_path / "mine", checkpoint=True)
    digest = hashlib.sha256((root / "clip.pt").read_bytes()).hexdigest()
    tiny = {"planted": False, "n_random_images": 8, "n_bootstrap": 20, "n_permutations": 20, "cascade": [1, 3]}
    (plan,), _ = bookrun.read_book_file(_book_file(root, **{"07_verdict": tiny}), tmp_path / "out", ["07_verdict"])
    executed = bookrun.run_chapter("07_verdict", tmp_path / "out" / "chapters", plan.params, kernel)
    record = json.loads((tmp_path / "out" / "results" / "07_verdict.json").read_text())
    assert record["parameters"]["loaded_architecture"] == "ConceptWorld-ViT"
    assert record["inputs"]["pretrained"]["path"] == str(root / "clip.pt")
    study, sanity = record["results"]["model_under_study"], record["results"]["sanity"]
    assert study["dataset"] == "imagefolder" and study["n_images"] == 8 and study["n_classes"] == 3
    assert set(sanity) == set(xp.MODEL_ONLY_MAPS) and record["results"]["planted"] is False
    cascade = sanity["class map"]["cascade"]
    assert [row["stages re-initialised"] for row in cascade] == [0, 1, 3, sanity["class map"]["n_stages"]]
    assert cascade[-1]["similarity"] < cascade[0]["similarity"]
    assert "scoreboard" not in record["results"] and record["headline"]
    assert hashlib.sha256((root / "clip.pt").read_bytes()).hexdigest() == digest
    text = "".join(o.get("text", "") for c in nbformat.read(executed, 4).cells for o in c.get("outputs", []))
    assert "Planted models: skipped (planted=False)" in text and "Exercises" in text
    chapters.run("07_verdict", {**plan.params, "results_dir": str(tmp_path / "scripted")})
    scripted = json.loads((tmp_path / "scripted" / "07_verdict.json").read_text())
    assert scripted["results"] == record["results"] and scripted["summary"] == record["summary"]
