"""The Discover-then-Name chapter on the real-model path: a local checkpoint, an ImageFolder, a word list."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from conceptlab.artifacts import read_results
from conceptlab.bookrun import run_chapter


@pytest.mark.slow
def test_chapter_runs_on_a_local_checkpoint_imagefolder_and_word_list(tmp_path, tiny_world, kernel):
    torch.manual_seed(0)
    checkpoint = tmp_path / "random_rn.pt"
    torch.save(open_clip.create_model("ConceptWorld-RN").state_dict(), checkpoint)  # random weights, real arch
    data_root = tiny_world.export_imagefolder(tmp_path / "images", 48, split="test")
    words = tmp_path / "words.txt"
    words.write_text(
        "\n".join(["red", "blue", "striped", "spotted", "head", "wings", "forest", "ocean", "car", "piano", "red"])
        + "\n"
    )
    params = dict(
        model="ConceptWorld-RN",
        pretrained=str(checkpoint),
        dataset="imagefolder",
        data_root=str(data_root),
        vocabulary=str(words),
        n_corpus=48,
        n_probe_train=32,
        n_test=16,
        sae_expansion=2,
        sae_batch_size=16,
        sae_epochs=2,
        sae_resample_every=1,
        probe_epochs=3,
        sae_reconstruction="sum",
        sae_l1=0.128,
        sweep_l1=[0.256],
        sweep_probe_lambda=[0.0],
        artifacts_dir=str(tmp_path / "artifacts"),
        results_dir=str(tmp_path / "results"),
    )
    executed = run_chapter("05_discover_then_name", tmp_path / "out", params, kernel)
    results = read_results(tmp_path / "results", "05_discover_then_name")
    numbers = results["results"]
    assert numbers["n_corpus"] == 48 and numbers["vocabulary_size"] == 10  # the duplicate "red" counted once
    assert numbers["n_concepts"] == 2 * 128  # ConceptWorld-RN embeds in 128 dimensions
    # the paper's sum, converted to the code's mean, and divided by the features' scale (unit RMS)
    assert numbers["sae_l1_original_scale"] == pytest.approx(0.128 / 128 / numbers["feature_scale"])
    assert set(numbers["l1_sweep"]) == {"0.128", "0.256"} and "tasks" not in numbers
    assert "share_right" not in numbers  # no ground truth on a real data set
    assert 0 <= numbers["accuracy_concept_probe"] <= 1 and 0 <= numbers["accuracy_raw_probe"] <= 1
    assert (
        numbers["original_code"]["accuracy_concept_probe"] != numbers["accuracy_concept_probe"]
        or numbers["original_code"]["sae_l0"] != numbers["sae_final_l0"]
    )  # the original's settings were run too
    assert results["parameters"]["vocabulary"] == str(words)
    differences = {row["switch"]: row for row in results["differences_from_original"]}
    assert differences["sae_reconstruction"]["this run follows"] == "paper"
    assert "No ground truth on a real data set" in json.dumps(json.loads(executed.read_text())["cells"])
    assert "share of right names" not in results["headline"] and "no ground truth" in results["summary"][0]
