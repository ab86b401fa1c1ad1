"""Real data sets: folder checks, class-name matching, example spreads, and maps on the pixels the model saw."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from conceptlab import plots
from conceptlab.data import (
    check_same_classes,
    load_cub,
    load_image_folder,
    load_images,
    load_train_test,
    model_view,
    spread_over_classes,
)
from conceptlab.descriptors import class_key, load_descriptors, match_class_names

matplotlib.use("Agg")


def _image(path, colour=(40, 120, 200), size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _folder(root, classes, per_class=2):
    for c in classes:
        for i in range(per_class):
            _image(root / c / f"{i}.png")
    return root


def test_hidden_folders_are_not_classes_and_a_broken_file_is_skipped_by_name(tmp_path):
    root = _folder(tmp_path / "data", ["cat", "dog"])
    _image(root / ".ipynb_checkpoints" / "x.png")
    _image(root / "cat" / ".hidden.png")
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="broken.jpg"):
        data = load_image_folder(root)
    assert data.class_names == ["cat", "dog"]
    assert len(data) == 4 and list(data.labels) == [0, 0, 1, 1]


def test_a_file_that_opens_but_does_not_decode_stops_with_its_name(tmp_path):
    good = _image(tmp_path / "a" / "good.jpg", size=(64, 64))
    cut = tmp_path / "a" / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.jpg.*replace or delete"):
        load_images([good, cut], open_clip.image_transform(32, is_train=False))


def test_train_and_test_folders_must_hold_the_same_classes(tmp_path):
    train = _folder(tmp_path / "train", ["cat", "dog", "owl"])
    test = _folder(tmp_path / "test", ["cat", "owl", "yak"])
    with pytest.raises(ValueError, match=r"only in train_root .*\['dog'\].*only in data_root .*\['yak'\]"):
        load_train_test("imagefolder", test, train)
    _folder(tmp_path / "test", ["dog"])
    (tmp_path / "test" / "yak" / "0.png").unlink()
    (tmp_path / "test" / "yak" / "1.png").unlink()
    (tmp_path / "test" / "yak").rmdir()
    tr, te = load_train_test("imagefolder", test, train)
    assert tr.class_names == te.class_names == ["cat", "dog", "owl"]
    check_same_classes(tr, te)


def _cub(root, names):
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "classes.txt": []}
    for c, folder in enumerate(names, start=1):
        lines["classes.txt"].append(f"{c} {folder}")
        for j in range(2):
            i = 2 * c + j
            _image(root / "images" / folder / f"{j}.jpg")
            lines["images.txt"].append(f"{i} {folder}/{j}.jpg")
            lines["image_class_labels.txt"].append(f"{i} {c}")
            lines["train_test_split.txt"].append(f"{i} {j}")
    for f, rows in lines.items():
        (root / f).write_text("\n".join(rows) + "\n")
    return root


CUB_FOLDERS = ["001.Black_footed_Albatross", "009.Brewer_Blackbird", "101.Chuck_will_Widow", "200.Common_Yellowthroat"]


def test_cub_descriptor_names_match_after_normalising(tmp_path, capsys):
    data = load_cub(_cub(tmp_path / "CUB_200_2011", CUB_FOLDERS), "test")
    assert len(data) == 4 and data.class_names[0] == "black footed albatross"
    path = tmp_path / "cub.json"
    path.write_text(
        json.dumps(
            {
                "Black-footed Albatross": ["long wings"],
                "Brewer's Blackbird": ["glossy"],
                "Chuck-will\u2019s-widow": ["mottled"],
                "common yellowthroat": ["mask"],
                "Dodo": ["extinct"],
            }
        )
    )
    table = load_descriptors(path, data.class_names)
    assert list(table) == data.class_names
    assert table["chuck will widow"] == ["mottled"] and table["brewer blackbird"] == ["glossy"]
    report = capsys.readouterr().out
    assert "4 of 4 classes matched (3 after normalising" in report and "'Dodo'" in report


def test_unmatched_classes_are_listed_with_the_closest_entries(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"Black-footed Albatros": ["long wings"], "Brewer's Blackbird": ["glossy"]}))
    with pytest.raises(ValueError, match="no descriptors for 1 of 2 classes.*black footed albatros"):
        load_descriptors(path, ["black footed albatross", "brewer blackbird"])


def test_two_entries_for_one_class_are_refused():
    assert class_key("001.Black_footed_Albatross") == class_key("Black-Footed  albatross") == "black footed albatross"
    with pytest.raises(ValueError, match="name the same class"):
        match_class_names(["Black-footed Albatross", "black_footed_albatross"], ["black footed albatross"])
    match = match_class_names(["Zebra", "Okapi"], ["zebra", "lion"])
    assert match.matched == {"zebra": "Zebra"} and match.missing == ["lion"] and match.unused == ["Okapi"]


def test_examples_spread_over_classes():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 1 + [3] * 10)
    idx = spread_over_classes(labels, 4, seed=1)
    assert sorted(labels[idx]) == [0, 1, 2, 3]
    more = spread_over_classes(labels, 9, seed=1)
    assert len(set(more.tolist())) == 9 and np.bincount(labels[more]).tolist() == [3, 3, 1, 2]
    assert np.array_equal(more, spread_over_classes(labels, 9, seed=1))
    assert len(spread_over_classes(labels[:5], 10)) == 5


def _photo_with_object(path):
    """A wide photo (300 x 150) with a red square at x 85..115, y 60..90."""
    img = np.full((150, 300, 3), 90, dtype=np.uint8)
    img[60:90, 85:115] = (230, 20, 20)
    Image.fromarray(img).save(path)
    return path


def test_display_image_is_exactly_what_the_model_saw(tmp_path):
    preprocess = open_clip.image_transform(224, is_train=False)
    img = Image.open(_photo_with_object(tmp_path / "wide.png")).convert("RGB")
    view = model_view(img, preprocess)
    assert view.shape == (224, 224, 3)
    norm = next(t for t in preprocess.transforms if isinstance(t, T.Normalize))
    assert torch.allclose(norm(T.functional.to_tensor(view)), preprocess(img), atol=0.02)


def test_overlay_hot_spot_lands_on_the_object_in_a_non_square_photo(tmp_path):
    preprocess = open_clip.image_transform(224, is_train=False)
    x, display = load_images([_photo_with_object(tmp_path / "wide.png")], preprocess, size=224)
    redness = (x[:, 0] - x[:, 1])[:, None]  # a "map" computed from the model's input, on a 7 x 7 grid
    heat = F.adaptive_avg_pool2d(redness, 7)  # (R=1, C=1, 7, 7)
    fig = plots.heatmap_grid(display, heat.numpy())
    drawn = np.asarray(fig.axes[1].images[1].get_array())
    y, x0 = np.unravel_index(drawn.argmax(), drawn.shape)
    r, g, b = display[0, y, x0]
    assert r > 200 and g < 60 and b < 60, f"hot spot at ({y}, {x0}) is on {display[0, y, x0]}, not the object"
