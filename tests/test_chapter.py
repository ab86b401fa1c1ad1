"""The chapter harness: every parameter validated before any work, results with every input."""

from __future__ import annotations

import hashlib
import json

import pytest

from conceptlab import chapter
from conceptlab.chapter import Param, ParameterError, Switch, differences_table, fidelity_table, setup, validate

SPEC = {
    "steps": Param(10, int, min=0),
    "lr": Param(1e-3, float, min=0.0),
    "dataset": Param("world", str, choices=("world", "imagefolder")),
    "data_root": Param(None, "dir", applies=lambda p: p["dataset"] != "world"),
    "weights": Param(None, "file"),
    "grid": Param([0.0, 0.1], list, item=float),
}


def _namespace(tmp_path, **given):
    defaults = {k: v.default for k, v in {**chapter.SHARED, **SPEC}.items()}
    defaults.update(artifacts_dir=str(tmp_path / "artifacts"), results_dir=str(tmp_path / "results"))
    defaults.update(given)
    return defaults


def test_defaults_pass_and_coercion_is_written_back(tmp_path):
    ns = _namespace(tmp_path, lr=1, steps=5.0, grid=(1, 2))
    ch = setup("99_test", ns, SPEC)
    assert ns["lr"] == 1.0 and isinstance(ns["lr"], float)
    assert ns["steps"] == 5 and isinstance(ns["steps"], int)
    assert ns["grid"] == [1.0, 2.0] and ch.params["grid"] == [1.0, 2.0]


def test_a_wrong_type_is_named_with_what_was_expected(tmp_path):
    with pytest.raises(ParameterError, match=r"steps='abc' \(str\) should be an integer"):
        validate(_namespace(tmp_path, steps="abc"), {**chapter.SHARED, **SPEC})


def test_a_misspelt_parameter_is_refused_with_a_suggestion(tmp_path):
    ns = _namespace(tmp_path)
    ns["step"] = 3  # papermill would only warn and run the full default
    with pytest.raises(ParameterError, match="unknown parameter 'step': did you mean 'steps'"):
        validate(ns, {**chapter.SHARED, **SPEC})


def test_every_problem_is_reported_at_once(tmp_path):
    ns = _namespace(
        tmp_path, steps=-1, dataset="imagenet", weights=str(tmp_path / "none.pt"), world={"habitat_corelation": 0.9}
    )
    with pytest.raises(ParameterError) as err:
        validate(ns, {**chapter.SHARED, **SPEC})
    message = str(err.value)
    assert "steps=-1 must be >= 0" in message
    assert "'imagenet' is not one of" in message
    assert "no such file" in message and "did you mean 'habitat_correlation'" in message
    lines = [line for line in message.splitlines() if line.strip().startswith("-")]
    assert len(lines) == 4  # the world typo is found with the types, not after them


def test_world_and_training_overrides_are_checked_against_their_configs(tmp_path):
    with pytest.raises(ParameterError, match="did you mean 'habitat_correlation'"):
        validate(_namespace(tmp_path, world={"habitat_corelation": 0.9}), {**chapter.SHARED, **SPEC})
    with pytest.raises(ParameterError, match="habitat_correlation=1.5 must lie in"):
        validate(_namespace(tmp_path, world={"habitat_correlation": 1.5}), {**chapter.SHARED, **SPEC})
    with pytest.raises(ParameterError, match="steps=0 must be positive"):
        validate(_namespace(tmp_path, world_clip={"steps": 0}), {**chapter.SHARED, **SPEC})


def test_model_and_pretrained_are_checked_before_any_work(tmp_path):
    with pytest.raises(ParameterError, match="Unknown open_clip model 'ViT-B-33'"):
        validate(_namespace(tmp_path, model="ViT-B-33"), {**chapter.SHARED, **SPEC})
    with pytest.raises(ParameterError, match="checkpoint file .* does not exist"):
        validate(_namespace(tmp_path, model="ViT-B-32", pretrained="/no/such/model.pt"), {**chapter.SHARED, **SPEC})
    with pytest.raises(ParameterError, match="no pretrained tag 'opneai'"):
        validate(_namespace(tmp_path, model="ViT-B-32", pretrained="opneai"), {**chapter.SHARED, **SPEC})


def test_a_chapter_check_runs_with_the_other_parameters(tmp_path):
    spec = {
        **SPEC,
        "layer": Param(
            "layer4",
            str,
            check=lambda v, p: None if v.startswith("layer") else f"no layer {v!r} in the model (steps={p['steps']})",
        ),
    }
    ns = _namespace(tmp_path, layer="fc9")
    with pytest.raises(ParameterError, match=r"layer: no layer 'fc9' in the model \(steps=10\)"):
        setup("99_test", ns, spec)


def test_in_a_kernel_only_the_parameters_and_injected_cells_hold_parameters(tmp_path):
    ns = _namespace(tmp_path)
    params_cell = f"{chapter.PARAMETERS_MARK}\nsteps = 10\nlr = 1e-3\n"
    ns["In"] = ["", params_cell, "from x import PARTS\nch = setup(...)"]
    ns["PARTS"] = ("head", "body")  # imported by the setup cell, not a parameter
    setup("99_test", ns, SPEC)
    ns["In"].insert(2, "# Parameters\nstepz = 3\n")  # papermill's injected cell, with a typo
    ns["stepz"] = 3
    with pytest.raises(ParameterError, match="'stepz'"):
        setup("99_test", ns, SPEC)
    # a live lesson: parameters edited and rerun after later cells made their own variables
    ns["In"] = ["", params_cell, "ch = setup(...)", "accuracy = {'top1': 0.9}", params_cell, "ch = setup(...)"]
    ns.pop("stepz")
    ns["accuracy"] = {"top1": 0.9}
    setup("99_test", ns, SPEC)


def test_results_record_inputs_by_content_and_only_parameters_that_applied(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"some weights")
    ch = setup("99_test", _namespace(tmp_path, weights=str(weights)), SPEC)
    ch.finish({"accuracy": 0.5}, summary=["half right"], headline={"accuracy": 0.5})
    record = json.loads((tmp_path / "results" / "99_test.json").read_text())
    assert record["inputs"]["weights"]["sha256"] and record["results"] == {"accuracy": 0.5}
    assert "data_root" not in record["parameters"], "data_root does not apply on the world"
    assert "pretrained" not in record["parameters"] and "world" in record["parameters"]
    key = ch.key()
    weights.write_bytes(b"other weights")  # overwrite the file in place
    again = setup("99_test", _namespace(tmp_path, weights=str(weights)), SPEC)
    assert again.key() != key, "a changed input file must change every artifact key"


def test_a_real_model_run_records_no_world_settings(tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    ch = setup(
        "99_test",
        _namespace(tmp_path, model="ViT-B-32", pretrained=str(ckpt), dataset="imagefolder", data_root=str(tmp_path)),
        SPEC,
    )
    applied = ch.applied()
    assert "world" not in applied and "world_clip" not in applied and applied["data_root"] == str(tmp_path)
    assert ch.model_key["pretrained"]["sha256"] == ch.inputs["pretrained"]["sha256"]


def _count(ch, factor: float = 1.0) -> dict[str, float]:
    _count.calls += 1
    return {"score": ch.params["steps"] * factor}


_count.calls = 0


def test_an_exercise_runs_both_settings_once_and_reports_the_change(tmp_path):
    ch = setup("99_test", _namespace(tmp_path), SPEC)
    table = ch.exercise("double", _count, factor=2.0)
    assert table.loc["as in the chapter", "score"] == 10 and table.loc["factor = 2.0", "score"] == 20
    assert table.loc["change", "score"] == 10
    calls = _count.calls
    ch.exercise("double", _count, factor=2.0)
    assert _count.calls == calls, "solutions are cached like any artifact"
    assert ch.exercise("double", _count, factor=3.0).loc["factor = 3.0", "score"] == 30


def _unsorted(ch, factor: float = 1.0) -> dict[str, float]:
    return {"value": factor, "value: low": factor - 1, "value: high": factor + 1, "clears": 1.0}


def test_an_exercise_table_keeps_the_order_its_function_gives(tmp_path):
    """Stored solutions keep the order of the exercise's numbers (a value before its interval), not the
    sorted keys of a JSON object, on the first run and when loaded from the store."""
    ch = setup("99_test", _namespace(tmp_path), SPEC)
    for _ in range(2):
        table = ch.exercise("order", _unsorted, factor=2.0)
        assert list(table.columns) == ["value", "value: low", "value: high", "clears"]


def test_differences_say_which_side_the_run_follows():
    switches = {
        "detach": Switch(paper=False, original=True, what="map losses reach the model or not"),
        "steps": Switch(paper=10, original=10, what="same"),
    }
    table = differences_table(switches, {"detach": True, "steps": 10})
    assert table.loc["detach", "this run follows"] == "original code"
    assert table.loc["steps", "this run follows"] == "paper and original code"
    fidelity = fidelity_table({"accuracy": {"paper": 0.7, "this book": 0.6}})
    assert list(fidelity.columns) == ["paper reports", "this book"]


def test_world_fields_are_type_checked_by_name_before_any_work(tmp_path):
    spec = {**chapter.SHARED, **SPEC}
    with pytest.raises(ParameterError, match=r"world_clip\.steps=300\.5 \(float\) should be an integer"):
        validate(_namespace(tmp_path, world_clip={"steps": 300.5}), spec)
    with pytest.raises(ParameterError, match=r"world_clip\.steps=300\.0 \(float\) should be an integer"):
        validate(_namespace(tmp_path, world_clip={"steps": 300.0}), spec)
    with pytest.raises(ParameterError) as err:
        validate(_namespace(tmp_path, world={"habitat_correlation": "high"}), spec)
    assert "world.habitat_correlation='high' (str) should be a number" in str(err.value)
    assert "not supported" not in str(err.value)
    with pytest.raises(ParameterError, match=r"world\.caption_mix\.visual='lots' \(str\) should be a number"):
        validate(_namespace(tmp_path, world={"caption_mix": {"visual": "lots"}}), spec)
    with pytest.raises(ParameterError, match=r"world\.n_classes=True \(bool\) should be an integer"):
        validate(_namespace(tmp_path, world={"n_classes": True}), spec)
    params = validate(_namespace(tmp_path, world_clip={"lr": 1}), spec)
    assert params["world_clip"] == {"lr": 1.0} and isinstance(params["world_clip"]["lr"], float)


def test_cross_field_problems_of_a_config_are_named_with_the_parameter(tmp_path):
    spec = {**chapter.SHARED, **SPEC}
    with pytest.raises(ParameterError, match=r"world_clip: .*batch_size=64 exceeds n_train=32"):
        validate(_namespace(tmp_path, world_clip={"n_train": 32, "batch_size": 64}), spec)
    with pytest.raises(ParameterError, match=r"world_clip: .*warmup=50 exceeds steps=20"):
        validate(_namespace(tmp_path, world_clip={"steps": 20}), spec)  # the default warm-up is 50 steps


def test_an_output_folder_that_is_a_file_is_refused_at_setup(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ParameterError, match="results_dir: .*results.json' is a file, not a folder"):
        setup("99_test", _namespace(tmp_path, results_dir=str(tmp_path / "results.json" / "sub")), SPEC)
    with pytest.raises(ParameterError, match="artifacts_dir: .* is a file"):
        setup("99_test", _namespace(tmp_path, artifacts_dir=str(tmp_path / "results.json")), SPEC)


def test_every_file_a_string_parameter_names_is_hashed_into_inputs_and_keys(tmp_path):
    spec = {**SPEC, "descriptors": Param("oracle", str), "embedding": Param("clip", str)}
    descriptors, glove = tmp_path / "descriptors.json", tmp_path / "glove.txt"
    descriptors.write_text('{"cat": ["whiskers"]}')
    glove.write_text("cat 0.1 0.2\n")
    ch = setup("99_test", _namespace(tmp_path, descriptors=str(descriptors), embedding=f"glove:{glove}"), spec)
    assert ch.inputs["descriptors"] == {
        "path": str(descriptors),
        "sha256": hashlib.sha256(descriptors.read_bytes()).hexdigest(),
    }
    assert ch.inputs["embedding"]["path"] == str(glove)
    assert not {"artifacts_dir", "results_dir", "model", "dataset"} & set(ch.inputs)
    key = ch.key()
    glove.write_text("cat 0.3 0.4\n")  # same size, other vectors
    again = setup("99_test", _namespace(tmp_path, descriptors=str(descriptors), embedding=f"glove:{glove}"), spec)
    assert again.key() != key
    plain = setup("99_test", _namespace(tmp_path), spec)
    assert "descriptors" not in plain.inputs and "embedding" not in plain.inputs


def test_a_data_folder_is_keyed_by_the_content_of_its_images(tmp_path):
    data = tmp_path / "images"
    (data / "cat").mkdir(parents=True)
    (data / "cat" / "1.jpg").write_bytes(b"a cat")
    ns = _namespace(tmp_path, dataset="imagefolder", data_root=str(data))
    key = setup("99_test", dict(ns), SPEC).key()
    (data / "cat" / "1.jpg").write_bytes(b"a dog")  # same name, same size
    assert setup("99_test", dict(ns), SPEC).key() != key


def test_the_loaded_architecture_is_recorded_with_its_activation(tmp_path):
    import open_clip

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    ch = setup("99_test", _namespace(tmp_path, model="ViT-B-32", pretrained=str(ckpt)), SPEC)
    assert "loaded_architecture" not in ch.applied()
    quick = open_clip.create_model("ConceptWorld-ViT", force_quick_gelu=True)
    ch._clip = (quick, None, None, None)  # as Chapter.clip() leaves a loaded CLIP
    assert ch.applied()["loaded_architecture"] == "ViT-B-32-quickgelu"
    assert chapter.loaded_architecture("ConceptWorld-ViT", quick) == "ConceptWorld-ViT (QuickGELU)"
    assert chapter.loaded_architecture("ViT-B-32", open_clip.create_model("ConceptWorld-ViT")) == "ViT-B-32"


def test_the_tests_tiny_clip_is_the_smoke_chapters_clip(tmp_path):
    """conftest's tiny CLIP and the smoke chapters share one store and one key: trained once per session."""
    from conftest import TINY_TRAIN, TINY_WORLD

    from conceptlab import chapters
    from conceptlab.bookrun import chapters as stems
    from conceptlab.bookrun import smoke_parameters

    for name in stems():
        ch = chapters.start(name, smoke_parameters(name, tmp_path))
        assert (ch.world_cfg, ch.train_cfg) == (TINY_WORLD, TINY_TRAIN), name
