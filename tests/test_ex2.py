"""EX2: queries, reward, world language model, GRPO alignment, judges and the ground-truth check."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from conceptlab import ex2
from conceptlab.judges import (
    JUDGE_PROMPT,
    OpenAIJudge,
    TransformersJudge,
    WorldJudge,
    judge_prompts,
    make_judge,
    parse_choice,
)
from conceptlab.models import encode_images, encode_texts
from conceptlab.textlm import WorldLMConfig, answer_sentence, load_lm, train_tokenizer, world_corpus, world_lm

TINY_LM = WorldLMConfig(n_classes=6, corpus_size=400, steps=40, batch_size=16, n_embd=32, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def tiny_lm(tiny_store):
    return world_lm(tiny_store, TINY_LM, ex2.TEMPLATES, progress=False)


def test_queries_are_templates_per_class_followed_by_a_blank_line(tiny_world):
    assert len(ex2.TEMPLATES) == 25 and len(set(ex2.TEMPLATES)) == 25
    assert all(t.count("{}") == 1 for t in ex2.TEMPLATES)
    q = ex2.format_queries(tiny_world.class_names)
    assert len(q) == 25 * 6
    assert all(p.endswith(".\n\n") or p.endswith("?\n\n") for p in q.prompt)
    assert all(name in p for name, p in zip(q.class_name, q.prompt))
    assert q.class_index.tolist() == [c for c in range(6) for _ in range(25)]


def test_reward_is_the_mean_cosine_to_the_class_images(tiny_clip, tiny_world):
    clip, _, tokenizer, _ = tiny_clip
    batch = tiny_world.sample(120, split="val")
    means = ex2.class_image_embeddings(clip, batch.images, batch.labels, 6, per_class=10)
    reward = ex2.CLIPReward(clip, tokenizer, means)
    texts = ["a zorbil with a large red head.", "click to enlarge photo of a quillfin",
             "the mossback lives in the ocean."]
    classes = [0, 1, 4]
    fast = reward(prompts=[""] * 3, completions=texts, class_index=classes)
    for text, c, value in zip(texts, classes, fast):  # the per-description definition
        idx = np.flatnonzero(batch.labels == c)[:10]
        slow = (encode_images(clip, batch.images[idx]) @ encode_texts(clip, tokenizer, [text])[0]).mean().item()
        assert value == pytest.approx(slow, abs=1e-5)


def test_class_embeddings_need_every_class(tiny_clip, tiny_world):
    batch = tiny_world.sample(64)
    keep = batch.labels != 2
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        ex2.class_image_embeddings(tiny_clip[0], batch.images[keep], batch.labels[keep], 6)


def test_corpus_follows_the_answer_mix(tiny_world):
    cfg = WorldLMConfig(n_classes=6, corpus_size=60, answer_mix={"habitat": 1.0})
    judge = WorldJudge(tiny_world)
    for doc in world_corpus(cfg, ex2.TEMPLATES):
        query, answer = doc.split("\n\n")
        c = next(k for k, n in enumerate(tiny_world.class_names) if n in query)
        label = judge.label(c, answer)
        assert label["type"] == "habitat" and label["habitat_true"] and not label["visual"]
    with pytest.raises(ValueError, match="unknown kinds"):
        WorldLMConfig(answer_mix={"colour": 1.0})


def test_tokenizer_round_trips_the_corpus():
    docs = world_corpus(WorldLMConfig(n_classes=6, corpus_size=80), ex2.TEMPLATES)
    tok = train_tokenizer(docs, 400)
    assert all(tok.decode(tok.encode(d)) == d for d in docs)


def test_world_judge_checks_descriptions_against_the_ground_truth(tiny_world):
    judge = WorldJudge(tiny_world)
    spec = tiny_world.classes[0]
    rng = np.random.default_rng(0)
    true_visual = judge.label(0, answer_sentence("visual_true", spec, rng))
    assert true_visual["type"] == "visual" and true_visual["visual_false"] == 0 and true_visual["informative"]
    false_visual = judge.label(0, answer_sentence("visual_false", spec, rng))
    assert false_visual["visual_false"] >= 1 and false_visual["visual_true"] == 0 and not false_visual["informative"]
    wrong_home = next(h for h in ("forest", "desert", "ocean") if h != spec.habitat)
    habitat = judge.label(0, f"the {spec.name} lives in the {wrong_home}.")
    assert habitat["type"] == "habitat" and not habitat["habitat_true"]
    spurious = judge.label(0, f"click to enlarge photo of a {spec.name}")
    assert spurious["type"] == "spurious" and not spurious["informative"] and spurious["mentions_class"]
    part, attrs = next(iter(spec.parts.items()))
    prompts = judge_prompts([spec.name] * 2, [f"a {spec.name} with a {attrs['size']} {attrs['colour']} {part}.",
                                              f"{spec.name} stock photo, royalty free"])
    assert judge(prompts) == ["yes", "no"]


def _biased_gpt2(tokenizer, favourite: str):
    """A GPT-2 whose next-token distribution always peaks on ``favourite``: ln_f outputs a constant vector."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=16, n_layer=1, n_head=2))
    direction = torch.nn.functional.normalize(torch.randn(16), dim=0)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        for variant in (favourite, " " + favourite, favourite.capitalize(), " " + favourite.capitalize()):
            model.transformer.wte.weight[tokenizer.encode(variant)[0]] = 8 * direction
    return model


@pytest.mark.parametrize("favourite", ["yes", "no"])
def test_transformers_judge_reads_the_model(favourite):
    tok = train_tokenizer([JUDGE_PROMPT, "yes no Yes No maybe"] * 5, 300)
    judge = TransformersJudge(_biased_gpt2(tok, favourite), tok)
    prompts = judge_prompts(["zorbil", "quillfin", "mossback"], ["a red head.", "nice photo", "lives in caves"])
    assert judge(prompts) == [favourite] * 3


def test_parse_choice():
    assert parse_choice("Yes, it does.") == "yes"
    assert parse_choice("no.") == "no"
    assert parse_choice("I cannot tell") is None
    assert parse_choice("It is about its habitat, not colour", ("colour", "habitat")) == "habitat"


class _ChatHandler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802  (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatHandler.seen.append((self.path, self.headers.get("Authorization"), body))
        text = body["messages"][0]["content"]
        answer = "Yes, it does." if "striped" in text else "No."
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_openai_judge_talks_to_a_compatible_endpoint(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        monkeypatch.setenv("EX2_TEST_KEY", "secret-123")
        judge = make_judge("openai:judge-model@" + url, api_key_env="EX2_TEST_KEY")
        answers = judge(judge_prompts(["zorbil"] * 2, ["a large striped tail.", "click to enlarge"]))
        assert answers == ["yes", "no"]
        path, auth, body = _ChatHandler.seen[-1]
        assert path == "/v1/chat/completions" and auth == "Bearer secret-123" and body["model"] == "judge-model"
        monkeypatch.delenv("EX2_TEST_KEY")
        with pytest.raises(RuntimeError, match="EX2_TEST_KEY is not set"):
            OpenAIJudge(url, "judge-model", api_key_env="EX2_TEST_KEY")
        with pytest.raises(ConnectionError, match="Could not reach"):
            OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key_env=None).ask("hello")
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="openai:<model>@<base_url>"):
        make_judge("openai:gpt")


def test_generation_is_seeded_and_saved(tiny_lm, tiny_world, tmp_path):
    model, tok, _ = tiny_lm
    q = ex2.format_queries(tiny_world.class_names).iloc[:12]
    a = ex2.generate_descriptions(model, tok, q, max_new_tokens=12, seed=3)
    b = ex2.generate_descriptions(model, tok, q, max_new_tokens=12, seed=3)
    assert a.description.tolist() == b.description.tolist() and len(a) == 12
    assert all(len(d.split()) <= 12 for d in a.description)  # each word takes at least one new token
    path = ex2.save_descriptions(a, tmp_path / "d.json")
    records = json.loads(path.read_text())
    assert [r["description"] for r in records] == a.description.tolist() and records[0]["prompt"] == q.prompt.iloc[0]


def test_grpo_alignment_logs_rewards_and_is_stored(tiny_lm, tiny_clip, tiny_world, tiny_store, monkeypatch):
    model, tok, _ = tiny_lm
    clip, _, clip_tok, _ = tiny_clip
    reward = ex2.CLIPReward(clip, clip_tok, ex2.world_class_embeddings(clip, tiny_world, per_class=8))
    q = ex2.format_queries(tiny_world.class_names)
    cfg = ex2.AlignConfig(steps=3, num_generations=2, prompts_per_step=2, max_new_tokens=8, lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy, _, history = ex2.aligned_lm(tiny_store, {"test": 1}, model, tok, reward, q, cfg, progress=False)
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(np.isfinite(h["reward"]) and "kl" in h for h in history)
    changed = any(not torch.equal(before[k], v) for k, v in policy.state_dict().items() if k in before)
    assert changed, "GRPO did not update the policy"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model was modified"
    monkeypatch.setattr(ex2, "align", lambda *a, **k: pytest.fail("retrained instead of loading"))
    _, _, again = ex2.aligned_lm(tiny_store, {"test": 1}, model, tok, reward, q, cfg, progress=False)
    assert again == history
    with pytest.raises(ValueError, match="num_generations"):
        ex2.AlignConfig(num_generations=1)


def test_load_lm_gives_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="save_pretrained"):
        load_lm(str(tmp_path / "missing"))


def test_counterfactuals_find_a_habitat_only_model(tiny_world, tiny_clip, monkeypatch):
    """A 'VLM' that classifies by background colour relies on the habitat and on no part colour."""
    clip, _, tokenizer, _ = tiny_clip
    proto = tiny_world.sample(256, "val", edit=lambda lab, att, hab: (att, tiny_world.home_habitats(lab)))
    border = lambda im: np.concatenate([im[:, :3].reshape(len(im), -1, 3),  # noqa: E731
                                        im[:, -3:].reshape(len(im), -1, 3)], 1).mean(1)
    ref = np.stack([border(proto.images[proto.labels == c]).mean(0) for c in range(6)])

    def background_features(model, images, **_):
        d = ((border(images.astype(np.float32))[:, None] - ref[None]) ** 2).sum(-1)
        return torch.nn.functional.one_hot(torch.as_tensor(d.argmin(1)), 6).float()

    monkeypatch.setattr(ex2, "encode_images", background_features)
    monkeypatch.setattr(ex2, "class_text_weights", lambda *a, **k: torch.eye(6))
    table = ex2.counterfactual_reliance(clip, tokenizer, tiny_world, n=192).set_index("factor")
    assert table.loc["habitat", "accuracy_base"] > 0.9
    assert table.loc["habitat", "reliance"] > 0.6
    parts = table.drop(index="habitat")
    assert (parts.reliance.abs() < 0.05).all(), parts


def test_rank_correlation_is_undefined_for_constant_input():
    assert ex2.rank_correlation([1, 2, 3], [0.1, 0.5, 0.9]) == pytest.approx(1.0)
    assert ex2.rank_correlation([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)
    assert ex2.rank_correlation([1, 2, 3], [0, 0, 0]) is None
