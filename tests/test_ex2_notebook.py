"""The EX2 chapter's real-model path: a local open_clip checkpoint, an ImageFolder, a local
transformers LM aligned with LoRA, and a transformers judge, all made here with random weights."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from conceptlab.bookrun import run_chapter
from conceptlab.textlm import word_tokenizer


def _image_folder(root, n_per_class: int = 4):
    rng = np.random.default_rng(0)
    for name, colour in {
        "001.Red_Finch": (200, 30, 30),
        "002.Blue_Jay": (30, 30, 200),
        "003.Green_Heron": (30, 180, 40),
    }.items():
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _random_lm(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    texts = [
        "Describe a photo of a red finch.\n\nthe red finch has a red head. yes no",
        "Write a caption for an image of a blue jay.\n\na blue jay in the forest.",
        "You want to explain what a green heron is to your students. Answer yes or no.",
    ] * 4
    tokenizer = word_tokenizer(texts)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=2048,
            n_embd=32,
            n_layer=2,
            n_head=2,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_real_path_runs_with_local_models(tmp_path, kernel):
    ckpt = tmp_path / "clip.pt"
    torch.save(open_clip.create_model("ConceptWorld-ViT").state_dict(), ckpt)
    lm = str(_random_lm(tmp_path / "lm"))
    templates = tmp_path / "mult_template_v1.json"
    templates.write_text(
        json.dumps(["Describe a photo of a {}.", "Write a caption for an image of a {}.", "What does a {} look like?"])
    )
    params = {
        "model": "ConceptWorld-ViT",
        "pretrained": str(ckpt),
        "dataset": "imagefolder",
        "data_root": str(_image_folder(tmp_path / "images")),
        "images_per_class": 4,
        "lm": lm,
        "judge": lm,
        "templates": str(templates),
        "lora_r": 4,
        "grpo_steps": 2,
        "num_generations": 2,
        "prompts_per_step": 2,
        "max_new_tokens": 8,
        "samples_per_query": 2,
        "artifacts_dir": str(tmp_path / "artifacts"),
        "results_dir": str(tmp_path / "results"),
    }
    run_chapter("04_ex2", tmp_path / "out", params, kernel)
    record = json.loads((tmp_path / "results" / "04_ex2.json").read_text())
    results = record["results"]
    assert 0 <= results["judge_yes_after"] <= 1
    assert results["share_false_after"] == 0  # "informative but false" needs the world's ground truth
    shares = sum(results[f"share_{k}_after"] for k in ("spurious", "visual", "nonvisual", "unparsed"))
    assert shares == pytest.approx(1.0)
    assert set(results["attribute_shares_after"]) >= {"colour", "habitat", "origin"}  # the attribute table
    assert record["inputs"]["templates"]["sha256"] and record["parameters"]["templates"] == str(templates)
    saved = list((tmp_path / "artifacts" / "ex2_descriptions").glob("*/descriptions.json"))
    assert len(saved) == 2 + record["parameters"]["null_draws"]  # before, the null's further draws, after
    records = json.loads(saved[0].read_text())
    assert len(records) == 3 * 3 * 2 and {r["class_name"] for r in records} == {"red finch", "blue jay", "green heron"}
    gain = results["gain"]
    assert gain["slots"] == 18 and gain["low"] <= gain["gain"] <= gain["high"]
    for world_only in ("knowledge", "kind_reward", "kind_mix", "planted", "spearman_reliance_gain"):
        assert world_only not in results
    assert "world" not in record["parameters"] and "lm_steps" not in record["parameters"]
