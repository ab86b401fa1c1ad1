"""Concept World: determinism, ground-truth consistency, planted rates, export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conceptlab.data import load_image_folder
from conceptlab.world import (
    ATTRIBUTES,
    CAPTION_STYLES,
    COLOURS,
    HABITATS,
    PARTS,
    ConceptWorld,
    WorldConfig,
    build_ontology,
    describe_part,
)


def _same(a, b) -> bool:
    return (
        all(
            np.array_equal(getattr(a, k), getattr(b, k))
            for k in ("images", "labels", "masks", "present", "attributes", "habitats")
        )
        and a.captions == b.captions
    )


def test_same_seed_is_bitwise_identical_and_other_seed_differs():
    a = ConceptWorld(seed=3).sample(600, "test")
    b = ConceptWorld(seed=3).sample(600, "test")
    c = ConceptWorld(seed=4).sample(600, "test")
    assert _same(a, b)
    assert not np.array_equal(a.images, c.images)


def test_streaming_matches_one_shot_sampling():
    world = ConceptWorld(seed=1)
    whole = world.sample(1100, "train")
    chunks = list(world.stream(1100, batch_size=300, split="train"))
    assert [len(c) for c in chunks] == [300, 300, 300, 200]
    assert np.array_equal(np.concatenate([c.images for c in chunks]), whole.images)
    assert sum((c.captions for c in chunks), []) == whole.captions


def test_splits_differ():
    world = ConceptWorld()
    assert not np.array_equal(world.sample(64, "train").images, world.sample(64, "test").images)


def test_classes_are_distinct_in_at_least_three_attributes():
    specs = build_ontology(16)
    codes = []
    for s in specs:
        codes.append([s.parts.get(p, {}).get(a) for p in PARTS for a in ATTRIBUTES])
    for i in range(len(codes)):
        for j in range(i):
            assert sum(x != y for x, y in zip(codes[i], codes[j])) >= 3, (specs[i].name, specs[j].name)


@pytest.mark.parametrize("resolution", [64, 224])
def test_masks_are_disjoint_and_cover_present_parts(resolution):
    batch = ConceptWorld(resolution=resolution).sample(40, "test")
    assert batch.images.shape == (40, resolution, resolution, 3)
    assert batch.masks.shape == (40, len(PARTS), resolution, resolution)
    assert batch.masks.sum(1).max() <= 1  # each pixel belongs to at most one part
    area = batch.masks.sum((2, 3))
    assert (area[~batch.present] == 0).all()
    assert (area[batch.present] > 0).mean() > 0.99


def test_creature_scale_does_not_depend_on_resolution():
    small = ConceptWorld(resolution=64).sample(64, "test").masks.mean()
    large = ConceptWorld(resolution=224).sample(64, "test").masks.mean()
    assert abs(small - large) < 0.01


def test_mask_pixels_carry_their_parts_colour():
    world = ConceptWorld(pixel_noise=0.0)
    batch = world.sample(200, "test")
    palette = np.array(list(COLOURS.values())) * 255
    checked = 0
    for i in range(50):
        for p in range(len(PARTS)):
            if not batch.present[i, p] or not batch.masks[i, p].any():
                continue
            colour, pattern = batch.attributes[i, p, 0], batch.attributes[i, p, 1]
            pixels = batch.images[i][batch.masks[i, p]].astype(float)
            is_base = np.abs(pixels - palette[colour]).max(1) <= 1
            if ATTRIBUTES["pattern"][pattern] == "plain":
                assert is_base.all()
            else:
                assert is_base.mean() > 0.3  # the rest are the darker pattern marks
            checked += 1
    assert checked > 150


def test_attribute_noise_and_habitat_correlation_rates():
    world = ConceptWorld(attribute_noise=0.3, habitat_correlation=0.6, resolution=16)  # rates need no pixels
    batch = world.sample(4000, "train")
    typical = world.typical_attributes(batch.labels)
    for k, values in enumerate(ATTRIBUTES.values()):
        atypical = (batch.attributes[..., k] != typical[..., k])[batch.present].mean()
        expected = 0.3 * (1 - 1 / len(values))
        assert abs(atypical - expected) < 0.03
    home = (batch.habitats == world.home_habitats(batch.labels)).mean()
    assert abs(home - (0.6 + 0.4 / len(HABITATS))) < 0.03


def test_caption_style_rates_follow_the_mix():
    mix = {"visual": 0.4, "class": 0.1, "habitat": 0.2, "behaviour": 0.1, "spurious": 0.2}
    batch = ConceptWorld(caption_mix=mix, resolution=16).sample(5000, "train")  # rates need no pixels
    styles = np.array(batch.caption_styles)
    for style in CAPTION_STYLES:
        p = mix[style]
        tolerance = 4 * np.sqrt(p * (1 - p) / len(styles))
        assert abs((styles == style).mean() - p) < tolerance, style


def test_captions_tell_the_truth_about_the_image():
    world = ConceptWorld()
    batch = world.sample(500, "train")
    for i, (text, style) in enumerate(zip(batch.captions, batch.caption_styles)):
        name = world.class_names[batch.labels[i]]
        if style == "visual":
            phrases = [describe_part(p, batch.attributes[i, k]) for k, p in enumerate(PARTS) if batch.present[i, k]]
            mentioned = [ph for ph in phrases if ph in text]
            assert mentioned, text
        elif style == "habitat":
            assert HABITATS[batch.habitats[i]] in text and name in text
        else:
            assert name in text


def test_spurious_rate_zero_plants_no_spurious_caption():
    mix = {"visual": 1.0, "class": 0.0, "habitat": 0.0, "behaviour": 0.0, "spurious": 0.0}
    batch = ConceptWorld(caption_mix=mix).sample(300)
    assert set(batch.caption_styles) == {"visual"}


def test_counterfactual_edit_keeps_pose_and_changes_only_the_edited_factor():
    world = ConceptWorld()
    a = world.sample(100, "test")
    b = world.sample(100, "test", edit=lambda labels, attrs, hab: (attrs, (hab + 1) % len(HABITATS)))
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.attributes, b.attributes)
    assert (a.habitats != b.habitats).all()
    creature = a.masks.any(1)
    assert np.array_equal(a.images[creature], b.images[creature])


def test_export_imagefolder_round_trip(tmp_path):
    world = ConceptWorld(n_classes=4)
    out = world.export_imagefolder(tmp_path, 24, split="val")
    images = load_image_folder(out)
    assert len(images) == 24 and set(images.class_names) <= set(world.class_names)
    rows = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    batch = world.sample(24, "val")
    assert [r["class"] for r in rows] == [world.class_names[c] for c in batch.labels]
    masks = np.load(out / rows[0]["masks"])["masks"]
    assert np.array_equal(masks, batch.masks[0])


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"habitat_correlation": 1.5}, "habitat_correlation"),
        ({"n_classes": 99}, "n_classes"),
        ({"resolution": 4}, "resolution"),
        ({"caption_mix": {"visual": 1.0, "poetry": 0.5}}, "poetry"),
        ({"n_classes": 6.0}, "n_classes=6.0 must be an integer"),
        ({"seed": True}, "seed=True must be an integer"),
        ({"habitat_correlation": "high"}, "habitat_correlation='high' must be a number"),
        ({"position_jitter": 1.5}, "position_jitter"),
        ({"blind": "body colour"}, "blind='body colour' must be a list"),
        ({"caption_mix": {"visual": "most"}}, "caption_mix"),
    ],
)
def test_bad_world_parameters_say_what_is_wrong(bad, word):
    with pytest.raises(ValueError, match=word):
        WorldConfig(**bad)


def test_world_integers_from_numpy_and_numbers_as_ints_are_accepted():
    assert WorldConfig(n_classes=np.int64(6), habitat_correlation=1).n_classes == 6


def test_statistics_measure_the_planted_rates():
    world = ConceptWorld(attribute_noise=0.0, habitat_correlation=1.0)
    stats = world.statistics(world.sample(300, "test"))
    assert stats["home habitat share"] == 1.0
    assert stats["atypical colour"] == stats["atypical pattern"] == stats["atypical size"] == 0.0
    noisy = ConceptWorld(attribute_noise=0.5, habitat_correlation=0.0)
    assert noisy.statistics(noisy.sample(300, "test"))["atypical colour"] > 0.3


def test_blind_field_leaves_the_default_key_and_images_unchanged():
    """Artifacts of every chapter are keyed by WorldConfig.to_dict(): the new field must not move them."""
    from conceptlab.artifacts import params_key

    assert "blind" not in WorldConfig().to_dict()
    assert params_key(WorldConfig().to_dict()) == "61562fee91ab378c"  # the key before `blind` existed
    assert params_key(WorldConfig(n_classes=6).to_dict()) != params_key(WorldConfig(blind=["body colour"]).to_dict())
    assert WorldConfig(**WorldConfig(blind=["head size"]).to_dict()) == WorldConfig(blind=("head size",))


def test_blind_attribute_is_random_and_the_rest_of_the_world_stays():
    plain = ConceptWorld(n_classes=6, attribute_noise=0.0).sample(600, "train")
    blind = ConceptWorld(n_classes=6, attribute_noise=0.0, blind=("body colour",)).sample(600, "train")
    body, colour = PARTS.index("body"), 0
    assert np.array_equal(plain.labels, blind.labels) and np.array_equal(plain.masks, blind.masks)
    other = np.ones(plain.attributes.shape, bool)
    other[:, body, colour] = False
    assert np.array_equal(plain.attributes[other], blind.attributes[other])
    # the blinded value no longer follows the class: about 1/8 of creatures keep their typical colour
    typical = (blind.attributes[:, body, colour] == plain.attributes[:, body, colour]).mean()
    assert 0.05 < typical < 0.25
    with pytest.raises(ValueError, match="beak colour"):
        WorldConfig(blind=("beak colour",))


def test_memoised_pixel_noise_renders_the_same_images_and_the_same_stream_after_it():
    """A warm noise cache changes nothing: the images, and the captions drawn from the stream after the
    noise (so the generator is left where a fresh draw would leave it)."""
    import conceptlab.world as world_module

    w = ConceptWorld(WorldConfig(n_classes=6))
    world_module._NOISE_CACHE.clear()
    cold = w.sample(600, "test")  # two blocks
    assert len(world_module._NOISE_CACHE) == 2
    warm = w.sample(600, "test")
    assert np.array_equal(cold.images, warm.images) and cold.captions == warm.captions
    other = ConceptWorld(WorldConfig(n_classes=6, seed=1)).sample(8, "test")
    assert not np.array_equal(other.images, cold.images[:8]), "another seed draws other noise"
    for block in range(world_module._NOISE_CACHE_BLOCKS + 2):
        w.sample(1, "train", start=block * 512)
    assert len(world_module._NOISE_CACHE) == world_module._NOISE_CACHE_BLOCKS


def test_painting_by_colour_index_equals_drawing_part_over_part():
    """The renderer paints each pixel from the index of the last part drawn over it; drawing every part's
    colours over the image in turn (the plain painter's algorithm, written out here) gives the same bytes."""
    from conceptlab.world import _part_shape

    world = ConceptWorld(WorldConfig(resolution=48))
    b = world.sample(300, "test")
    rng = np.random.default_rng(3)
    n = len(b.labels)
    geometry = {
        "cx": rng.uniform(-0.2, 0.2, n),
        "cy": rng.uniform(-0.2, 0.2, n),
        "scale": rng.uniform(0.7, 1.2, n),
        "facing": np.where(rng.random(n) < 0.5, -1.0, 1.0),
        "phase": rng.uniform(0, 6, n),
    }
    images, masks = world._draw(b.attributes, b.present, b.habitats, geometry)

    col = lambda a: a.astype(np.float32)[:, None, None]  # noqa: E731
    u = (world._x - col(geometry["cx"])) / col(geometry["scale"]) * col(geometry["facing"])
    v = (world._y - col(geometry["cy"])) / col(geometry["scale"])
    expected = world._backgrounds(b.habitats, geometry["phase"])
    stripes, spots = np.sin(u * 22) > 0.35, np.sin(u * 20 + 1) * np.sin(v * 20 + 1) > 0.45
    grow = np.where(b.attributes[:, :, 2] == 1, 1.2, 0.85).astype(np.float32)
    for p, part in enumerate(PARTS):
        shape = _part_shape(part, u, v, col(grow[:, p])) & b.present[:, p, None, None]
        base = world._palette[np.maximum(b.attributes[:, p, 0], 0)][:, None, None, :]
        dark = np.where(base.mean(-1, keepdims=True) < 0.3, 0.55 + 0.45 * base, 0.45 * base)
        pattern = b.attributes[:, p, 1, None, None]
        marks = ((pattern == 1) & stripes) | ((pattern == 2) & spots)
        np.copyto(expected, base, where=(shape & ~marks)[..., None])
        np.copyto(expected, dark, where=(shape & marks)[..., None])
    assert np.array_equal(images, expected)
    assert (masks.sum(1) <= 1).all() and masks.any(axis=(2, 3)).sum() > n  # occlusion left one part per pixel
