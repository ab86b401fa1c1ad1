"""Descriptors: the world oracle, parsing, files in the original format, and the two LLM backends."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conceptlab.artifacts import ArtifactStore
from conceptlab.descriptors import (
    FEW_SHOT,
    OpenAIChat,
    TransformersLLM,
    cached_llm_descriptors,
    description_logits,
    descriptor_sentence,
    few_shot_prompt,
    get_descriptors,
    llm_descriptors,
    load_descriptors,
    oracle_descriptors,
    parse_bullets,
    rich_label,
    save_descriptors,
)
from conceptlab.models import class_text_weights, encode_images, topk_accuracy
from conceptlab.world import ATTRIBUTES, PARTS


@pytest.mark.parametrize(
    "answer, expected",
    [
        (
            " red striped head\n- large blue wings\n- small tail.\n\nQ: What are",
            ["red striped head", "large blue wings", "small tail"],
        ),
        (
            "Here they are:\n1. **Red head**\n2) blue wings\n* Red head\n\u2022 long tail",
            ["Red head", "blue wings", "long tail"],
        ),
        ("red head\nblue wings", ["red head", "blue wings"]),
        ("", []),
    ],
)
def test_parse_bullets(answer, expected):
    assert parse_bullets(answer) == expected


def test_prompt_and_texts():
    prompt = few_shot_prompt("zorbil", 6)
    assert prompt.endswith("to tell there is a zorbil in a photo:\n-")
    assert prompt.count("Q:") == len(FEW_SHOT) + 1 and "list 6 of them" in prompt
    assert descriptor_sentence("zorbil", "red head") == "zorbil, which has red head"
    assert descriptor_sentence("zorbil", "lives in the ocean") == "zorbil, which lives in the ocean"
    assert rich_label("zorbil", ["red head", "blue wings"]) == "zorbil. It may contain red head, blue wings"


def test_oracle_without_faults_matches_the_ontology(tiny_world):
    ds = oracle_descriptors(tiny_world, n=6, fault_rate=0.0)
    for spec in tiny_world.classes:
        descs, parts = ds.descriptors[spec.name], ds.parts[spec.name]
        assert len(descs) == 6 and set(parts) <= set(spec.parts)
        assert parts[0] == "head" and set(spec.parts) <= set(parts)  # every part described, head first
        for text, part in zip(descs, parts):
            words = text.split()
            assert words[-1] == part
            for attribute, value in spec.parts[part].items():  # every attribute word is the true one
                assert not (set(words) & set(ATTRIBUTES[attribute]) - {value})
    assert all(f is None for fs in ds.faults.values() for f in fs)


def test_oracle_faults(tiny_world):
    ds = oracle_descriptors(tiny_world, n=6, fault_rate=1.0, seed=3)
    faults = [f for fs in ds.faults.values() for f in fs]
    assert all(f is not None for f in faults) and set(faults) == {"wrong_attribute", "non_visual", "vague"}
    for spec in tiny_world.classes:
        for text, part, fault in zip(ds.descriptors[spec.name], ds.parts[spec.name], ds.faults[spec.name]):
            if fault == "wrong_attribute":
                assert part is not None and spec.parts[part]["colour"] not in text.split()
            else:
                assert part is None
    half = oracle_descriptors(tiny_world, n=6, fault_rate=0.3, seed=3)
    share = np.mean([f is not None for fs in half.faults.values() for f in fs])
    assert 0.05 < share < 0.6
    assert half.descriptors == oracle_descriptors(tiny_world, n=6, fault_rate=0.3, seed=3).descriptors


def test_part_masks(tiny_world):
    ds = oracle_descriptors(tiny_world, n=6)
    batch = tiny_world.sample(4, "test")
    masks = ds.part_masks(tiny_world.class_names, batch.labels, batch.masks)
    for i, c in enumerate(batch.labels):
        for j, part in enumerate(ds.parts[tiny_world.class_names[c]]):
            np.testing.assert_array_equal(masks[i, j], batch.masks[i, PARTS.index(part)])


def test_files_in_the_original_format(tmp_path):
    path = save_descriptors(tmp_path / "d.json", {"Black_Footed Albatross": ["long wings"], "zebra": ["stripes"]})
    assert json.loads(path.read_text()) == {"Black_Footed Albatross": ["long wings"], "zebra": ["stripes"]}
    assert load_descriptors(path, ["zebra", "black footed albatross"]) == {
        "zebra": ["stripes"],
        "black footed albatross": ["long wings"],
    }
    with pytest.raises(ValueError, match="no descriptors for 1 of 2 classes"):
        load_descriptors(path, ["zebra", "okapi"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_descriptors(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text(json.dumps({"zebra": "stripes"}))
    with pytest.raises(ValueError, match="do not map to a non-empty list"):
        load_descriptors(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError, match="No descriptor file"):
        load_descriptors(tmp_path / "missing.json")


def test_classification_by_description_beats_chance(tiny_clip, tiny_world):
    model, _, tokenizer, _ = tiny_clip
    batch = tiny_world.sample(96, "test")
    feats = encode_images(model, batch.images)
    logits = description_logits(
        feats, model, tokenizer, oracle_descriptors(tiny_world).descriptors, tiny_world.class_names
    )
    assert logits.shape == (96, 6)
    zero_shot = feats @ class_text_weights(model, tokenizer, tiny_world.class_names).T
    assert topk_accuracy(logits, batch.labels) > 1.5 / 6 and topk_accuracy(zero_shot, batch.labels) > 1.5 / 6


# ---------------------------------------------------------------------------- transformers backend
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 1-layer GPT-2 with a byte-level BPE tokenizer built here, trained briefly on bullet answers."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    corpus = few_shot_prompt("zorbil") + " red head\n- blue wings\n- striped tail\n"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([corpus] * 4, vocab_size=400, min_frequency=1, special_tokens=["<|end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=64, n_layer=2, n_head=2))
    ids = tokenizer(corpus, return_tensors="pt")["input_ids"]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):  # memorise the answer format so that greedy decoding writes bullets
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_transformers_backend(tiny_lm, tmp_path):
    llm = TransformersLLM(str(tiny_lm))
    table, raw = llm_descriptors(llm, ["zorbil", "quillfin"], n=3, progress=False)
    assert raw["zorbil"] == llm(few_shot_prompt("zorbil", 3))  # greedy: deterministic
    assert table["zorbil"] == parse_bullets(raw["zorbil"], limit=3) and 1 <= len(table["zorbil"]) <= 3
    store = ArtifactStore(tmp_path)
    ds = get_descriptors(f"hf:{tiny_lm}", ["zorbil", "quillfin"], store, n=3)
    assert ds.descriptors["zorbil"] == table["zorbil"] and ds.parts["zorbil"] == [None] * len(table["zorbil"])
    with pytest.raises(RuntimeError, match="Could not load the language model"):
        TransformersLLM(str(tmp_path / "no_such_model"))


# ---------------------------------------------------------------------------- OpenAI-compatible backend
@pytest.fixture()
def chat_server():
    """A local OpenAI-compatible endpoint that records requests and answers with a bullet list."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers["Authorization"], "body": body})
            if self.headers["Authorization"] != "Bearer sk-test":
                self.send_response(401)
                self.end_headers()
                return
            cls = body["messages"][0]["content"].split("distinguishing a ")[-1].split(" in a photo")[0]
            reply = {"choices": [{"message": {"content": f"Sure:\n- {cls} red head\n- blue wings\n- striped tail"}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def test_openai_backend_with_cache(chat_server, monkeypatch, tmp_path):
    url, seen = chat_server
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test")
    chat = OpenAIChat("tiny-chat", base_url=url, api_key_env="TEST_LLM_KEY")
    store = ArtifactStore(tmp_path)
    table = cached_llm_descriptors(chat, ["zorbil", "quillfin"], store, n=3, progress=False)
    assert table == {
        "zorbil": ["zorbil red head", "blue wings", "striped tail"],
        "quillfin": ["quillfin red head", "blue wings", "striped tail"],
    }
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["auth"] == "Bearer sk-test"
    assert seen[0]["body"]["temperature"] == 0 and seen[0]["body"]["model"] == "tiny-chat"
    assert cached_llm_descriptors(chat, ["zorbil", "quillfin"], store, n=3, progress=False) == table
    assert len(seen) == 2  # the second call came from the store
    monkeypatch.setenv("TEST_LLM_KEY", "wrong")
    with pytest.raises(RuntimeError, match="HTTP 401"):
        OpenAIChat("tiny-chat", base_url=url, api_key_env="TEST_LLM_KEY")("hello")


def test_openai_backend_errors(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(RuntimeError, match="NO_SUCH_KEY_VAR is not set"):
        OpenAIChat("m", api_key_env="NO_SUCH_KEY_VAR")
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test")
    with pytest.raises(ConnectionError, match="Could not reach the LLM endpoint"):
        OpenAIChat("m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env="TEST_LLM_KEY", timeout=5)("hi")


def _chapter(tiny_store, tmp_path, **values):
    from conceptlab import chapter
    from conceptlab.chapters import descriptors as story

    namespace = {
        "world": {"n_classes": 6},
        "world_clip": {"n_train": 512, "steps": 20, "batch_size": 32, "warmup": 5},
        "artifacts_dir": str(tiny_store.root),
        "results_dir": str(tmp_path),
        "n_test": 24,
        **values,
    }
    return chapter.setup("02_descriptors", namespace, story.PARAMETERS)


def test_chapter_exercise_changes_with_the_concept_text(tiny_clip, tiny_store, tmp_path):
    """The descriptors chapter's exercise is computed: the sentence form changes the maps' scores."""
    from conceptlab.chapters import descriptors as story
    from conceptlab.plots import human_label

    ch = _chapter(tiny_store, tmp_path, n_explain=12)
    table = ch.exercise("sentence", story.exercise, concept_text="sentence")
    change = table.iloc[2]
    assert change[human_label("disentanglability")] != 0 and change[human_label("description_top1")] == 0
    assert story.check_descriptor_source("oracle", {"dataset": "cub"}) is not None
    assert story.check_descriptor_source("no/such/file.json", {}) is not None


def test_explained_images_span_the_classes_and_respect_n_explain(tiny_world, tiny_store, tmp_path):
    from conceptlab.chapters import descriptors as story

    ch = _chapter(tiny_store, tmp_path, n_explain=6)
    labels = np.repeat(np.arange(6), 4)  # sorted: the first 6 images are all of class 0
    rows = story.explained_rows(ch, SimpleNamespace(labels=labels))
    assert len(rows) == 6 and len(set(labels[rows].tolist())) == 6


def test_more_faults_exercise_says_it_does_not_apply_to_a_file(tiny_store, tmp_path, capsys):
    from conceptlab.chapters import descriptors as story

    path = tmp_path / "d.json"
    path.write_text(json.dumps({"a": ["x"]}))
    ch = _chapter(tiny_store, tmp_path, descriptors=str(path))
    assert story.faults_exercise(ch) is None
    assert "does not apply" in capsys.readouterr().out
    assert "fault_rate" not in ch.applied()
