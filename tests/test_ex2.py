"""EX2: queries, reward, world language model, GRPO alignment, judges and the ground-truth check."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
import torch

from conceptlab import ex2
from conceptlab.judges import (
    ATTRIBUTE,
    INFORMATIVE,
    OpenAIJudge,
    TransformersJudge,
    WorldJudge,
    judge_messages,
    judge_problem,
    make_judge,
    parse_answer,
    parse_choice,
)
from conceptlab.models import encode_images, encode_texts
from conceptlab.textlm import (
    WorldLMConfig,
    answer_sentence,
    lm_load_kwargs,
    load_lm,
    train_tokenizer,
    world_corpus,
    world_lm,
)

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
    assert false_visual["claims"] >= 1 and false_visual["n_true"] == 0
    wrong_home = next(h for h in ("forest", "desert", "ocean") if h != spec.habitat)
    habitat = judge.label(0, f"the {spec.name} lives in the {wrong_home}.")
    assert habitat["type"] == "habitat" and not habitat["habitat_true"]
    spurious = judge.label(0, f"click to enlarge photo of a {spec.name}")
    assert spurious["type"] == "spurious" and not spurious["informative"] and spurious["claims"] == 0
    part, attrs = next(iter(spec.parts.items()))
    texts = [f"a {spec.name} with a {attrs['size']} {attrs['colour']} {part}.", f"{spec.name} stock photo",
             f"the {spec.name} lives in the {spec.habitat}."]
    assert judge.ask(INFORMATIVE, [spec.name] * 3, texts) == ["yes", "no", "yes"]
    assert judge.ask(ATTRIBUTE, [spec.name] * 3, texts) == ["colour", "other", "habitat"]
    with pytest.raises(ValueError, match="unknown"):
        judge.ask(INFORMATIVE, ["no-such-class"], ["text"])


def _world_texts(world):
    """One description of each kind for class 0: true visual, false visual, true habitat, spurious, one fact."""
    spec = world.classes[0]
    rng = np.random.default_rng(1)
    part, attrs = next(iter(spec.parts.items()))
    return spec, [answer_sentence("visual_true", spec, rng), answer_sentence("visual_false", spec, rng),
                  f"the {spec.name} lives in the {spec.habitat}.", f"click to enlarge photo of a {spec.name}.",
                  f"the {spec.name} has a {attrs['colour']} {part} and lives in the {spec.habitat}."]


def test_inspection_keeps_false_descriptions_out_of_spurious(tiny_world):
    spec, texts = _world_texts(tiny_world)
    df = pd.DataFrame({"class_index": 0, "class_name": spec.name, "description": texts})
    out = ex2.inspect(df, WorldJudge(tiny_world), tiny_world)
    assert out.kind.tolist() == ["visual", "false", "non-visual", "spurious", "visual"]
    shares = ex2.kind_shares(out)
    assert shares["false"] == pytest.approx(0.2) and shares["spurious"] == pytest.approx(0.2)
    assert list(shares.index) == list(ex2.KINDS)
    # a judge that calls everything uninformative still cannot make the false one spurious
    class No:
        def ask(self, question, names, texts):
            return ["no"] * len(texts)

    assert ex2.inspect(df, No(), tiny_world).kind.tolist() == ["spurious", "false", "spurious", "spurious",
                                                               "spurious"]
    # a stricter world judge (two true facts) moves the one-fact descriptions to spurious, not the two-fact one
    strict = ex2.inspect(df, WorldJudge(tiny_world, min_true=2), tiny_world)
    assert strict.kind.tolist()[2:] == ["spurious", "spurious", "visual"]


def test_inspection_sorts_attribute_types_on_real_data():
    class Scripted:
        answers = {"informative": ["yes", "no", "yes", None], "attribute": ["colour", "habitat"]}

        def ask(self, question, names, texts):
            assert len(texts) == len(self.answers[question.name])
            return self.answers[question.name]

    df = pd.DataFrame({"class_name": ["red finch"] * 4, "description": ["a", "b", "c", "d"]})
    out = ex2.inspect(df, Scripted())
    assert out.kind.tolist() == ["visual", "spurious", "non-visual", "unparsed"]
    table = ex2.attribute_table({"after": out})
    assert table.loc[("visual", "colour"), "after"] == 0.5 and table.loc[("non-visual", "habitat"), "after"] == 0.5
    assert table["after"].sum() == pytest.approx(1.0)


def _biased_gpt2(tokenizer, favourite: str):
    """A GPT-2 whose next-token distribution, the same at every position (ln_f outputs a constant vector),
    peaks on the tokens of ``favourite``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=2048, n_embd=16, n_layer=1, n_head=2))
    direction = torch.nn.functional.normalize(torch.randn(16), dim=0)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        for token in tokenizer.encode(favourite):
            model.transformer.wte.weight[token] = 8 * direction
    return model


@pytest.mark.parametrize("favourite", ["yes", "no"])
def test_transformers_judge_reads_the_model(favourite):
    tok = train_tokenizer([INFORMATIVE.template, '{"answer": "yes"} {"answer": "no"} Yes No maybe'] * 5, 300)
    model = _biased_gpt2(tok, favourite + '"')
    judge = TransformersJudge(model, tok)
    assert judge.ask(INFORMATIVE, ["zorbil", "quillfin"], ["a red head.", "nice photo"]) == [favourite] * 2
    prompt = judge.render(INFORMATIVE, "zorbil", "a red head.")
    assert prompt.endswith('assistant: {"answer": "') and "goldfinch" in prompt  # the worked example


def test_parse_answer_reads_json_and_refuses_guesses():
    assert parse_choice("It is about its habitat, not colour", ("colour", "habitat")) == "habitat"
    assert parse_answer('{"explanation": "It names the colour.", "answer": "Yes"}') == "yes"
    assert parse_answer('{"explanation": "x", "increases_knowledge": "No"}') == "no"  # the original's key
    assert parse_answer('```json\n{"answer": "no", "explanation": "nothing"}\n```') == "no"
    assert parse_answer("Answer: yes. It names the wings.") == "yes"
    assert parse_answer("No. It only says where to click.") == "no"
    assert parse_answer("The snippet does not say yes or no") is None
    assert parse_answer('{"answer": "maybe"}') is None and parse_answer("") is None and parse_answer(None) is None
    assert parse_answer('{"answer": "habitat"}', ATTRIBUTE.options) == "habitat"


def test_judge_messages_follow_the_original_structure():
    messages = judge_messages(INFORMATIVE, "zorbil", "click to enlarge")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "JSON" in messages[0]["content"]
    example = json.loads(messages[2]["content"])
    assert list(example) == ["explanation", "answer"] and example["answer"] == "yes"
    assert messages[3]["content"].endswith("Text snippet: click to enlarge")
    assert "increases your students' knowledge about zorbil" in messages[3]["content"]
    assert list(json.loads(judge_messages(ATTRIBUTE, "z", "t", answer_first=True)[2]["content"]))[0] == "answer"


# What the test server answers, by a word in the snippet: well-formed, fenced, loose and malformed replies.
REPLIES = {
    "striped": '{"explanation": "It names the tail pattern.", "answer": "Yes"}',
    "fenced": '```json\n{"explanation": "It only says where to click.", "increases_knowledge": "No"}\n```',
    "loose": "Yes - it names the colour of the head.",
    "garbled": "I would rather not say.",
    "forest": '{"explanation": "It says where it lives.", "answer": "habitat"}',
}


class _ChatHandler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802  (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatHandler.seen.append((self.path, self.headers.get("Authorization"), body))
        snippet = body["messages"][-1]["content"].rsplit("Text snippet:", 1)[1]
        answer = next(reply for word, reply in REPLIES.items() if word in snippet)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):  # noqa: N802
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def chat_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_judge_talks_to_a_compatible_endpoint(chat_url, monkeypatch):
    monkeypatch.setenv("EX2_TEST_KEY", "secret-123")
    judge = make_judge("openai:judge-model@" + chat_url, api_key_env="EX2_TEST_KEY")
    texts = ["a large striped tail.", "fenced: click to enlarge", "loose: a red head", "garbled text"]
    assert judge.ask(INFORMATIVE, ["zorbil"] * 4, texts) == ["yes", "no", "yes", None]
    assert judge.ask(ATTRIBUTE, ["zorbil"], ["lives in the forest"]) == ["habitat"]
    path, auth, body = _ChatHandler.seen[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer secret-123" and body["model"] == "judge-model"
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["temperature"] == 0 and len(judge.replies) == 5 and judge.replies[3] == REPLIES["garbled"]
    df = pd.DataFrame({"class_name": ["zorbil"] * 4, "description": texts})
    assert ex2.inspect(df, judge).kind.tolist() == ["unparsed", "spurious", "unparsed", "unparsed"]


def test_judge_problems_are_found_before_any_work(chat_url, monkeypatch):
    monkeypatch.setenv("EX2_TEST_KEY", "k")
    assert judge_problem("openai:m@" + chat_url, "EX2_TEST_KEY") is None
    assert judge_problem("openai:m@" + chat_url, None) is None  # a local server without keys
    monkeypatch.delenv("EX2_TEST_KEY")
    assert "EX2_TEST_KEY" in judge_problem("openai:m@" + chat_url, "EX2_TEST_KEY")
    with pytest.raises(RuntimeError, match="EX2_TEST_KEY is not set"):
        OpenAIJudge(chat_url, "judge-model", api_key_env="EX2_TEST_KEY")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert "unreachable" in judge_problem(f"openai:m@http://127.0.0.1:{port}/v1", None)
    with pytest.raises(ConnectionError, match="Could not reach"):
        OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None).ask(INFORMATIVE, ["z"], ["t"])
    assert "openai:<model>@<base_url>" in judge_problem("openai:gpt")
    assert "Concept World" in judge_problem("world", on_world=False) and judge_problem("world") is None
    assert "no folder" in judge_problem("./no/such/judge")
    with pytest.raises(ValueError, match="openai:<model>@<base_url>"):
        make_judge("openai:gpt")


def test_chapter_validates_the_judge_before_training(monkeypatch):
    from conceptlab.chapter import ParameterError, setup

    monkeypatch.delenv("EX2_NO_KEY", raising=False)
    namespace = {"judge": "openai:m@http://127.0.0.1:9/v1", "judge_api_key_env": "EX2_NO_KEY",
                 "templates": None, "artifacts_dir": "/nonexistent/never-used"}
    with pytest.raises(ParameterError, match="EX2_NO_KEY"):
        setup("04_ex2", namespace, ex2.PARAMETERS)


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
    policy, history = ex2.aligned_lm(tiny_store, {"test": 1}, model, tok, reward, q, cfg, progress=False)
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(np.isfinite(h["reward"]) and "kl" in h for h in history)
    changed = any(not torch.equal(before[k], v) for k, v in policy.state_dict().items() if k in before)
    assert changed, "GRPO did not update the policy"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model was modified"
    monkeypatch.setattr(ex2, "align", lambda *a, **k: pytest.fail("retrained instead of loading"))
    _, again = ex2.aligned_lm(tiny_store, {"test": 1}, model, tok, reward, q, cfg, progress=False)
    assert again == history
    with pytest.raises(ValueError, match="num_generations"):
        ex2.AlignConfig(num_generations=1)


def test_lora_alignment_keeps_one_copy_and_the_base_intact(tiny_lm, tiny_clip, tiny_world, tmp_path, monkeypatch):
    """The GPU path's memory rules, run on the CPU: LoRA trains adapters on the model itself (no deep copy,
    trl's reference is the adapter-disabled base), only the adapters are saved, and the base comes back intact."""
    from trl import GRPOTrainer

    model, tok, _ = tiny_lm
    clip, _, clip_tok, _ = tiny_clip
    reward = ex2.CLIPReward(clip, clip_tok, ex2.world_class_embeddings(clip, tiny_world, per_class=8))
    cfg = ex2.AlignConfig(steps=2, num_generations=2, prompts_per_step=2, max_new_tokens=6, lr=1e-2, lora_r=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    original_init = GRPOTrainer.__init__

    def spy(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        seen["ref_model"], seen["same"] = self.ref_model, kwargs["model"] is model

    monkeypatch.setattr(GRPOTrainer, "__init__", spy)
    ex2.align(model, tok, reward, ex2.format_queries(tiny_world.class_names), cfg, tmp_path, progress=False)
    monkeypatch.undo()
    assert seen == {"ref_model": None, "same": True}
    assert (tmp_path / "policy" / "adapter_config.json").exists()
    assert not (tmp_path / "policy" / "model.safetensors").exists()
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the base model was modified"
    policy = ex2.load_policy(tmp_path / "policy", model)
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_precision_and_placement_follow_the_hardware():
    assert lm_load_kwargs("cpu") == {"dtype": torch.float32}
    assert lm_load_kwargs("cuda", bf16_supported=True) == {"dtype": torch.bfloat16, "device_map": "auto"}
    assert lm_load_kwargs("cuda:0", bf16_supported=False)["dtype"] == torch.float16
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        lm_load_kwargs("cpu", "8bit")
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        lm_load_kwargs("cuda", "4bit", bf16_supported=True, bitsandbytes=False)
    with pytest.raises(ValueError, match="quantization"):
        lm_load_kwargs("cuda", "3bit")
    assert ex2.training_precision(cuda=False) == {"use_cpu": True, "bf16": False, "fp16": False}
    assert ex2.training_precision(cuda=True, bf16_supported=True) == {"use_cpu": False, "bf16": True, "fp16": False}
    assert ex2.training_precision(cuda=True, bf16_supported=False)["fp16"]


def test_templates_file_round_trips(tmp_path, tiny_world):
    original_style = ["Describe a photo of a {}.", "Compare and contrast the visual characteristics of different {}."]
    path = ex2.save_templates(original_style, tmp_path / "mult_template_v1.json")
    assert json.loads(path.read_text()) == original_style  # the original's format: a JSON list of strings
    assert ex2.load_templates(path) == original_style
    assert ex2.load_templates(None) == list(ex2.TEMPLATES) == ex2.load_templates("default")
    q = ex2.format_queries(tiny_world.class_names, ex2.load_templates(path))
    assert len(q) == 2 * 6 and q.prompt[1] == f"Compare and contrast the visual characteristics of different " \
                                               f"{tiny_world.class_names[0]}.\n\n"
    for bad in ({"a": "{}"}, [], ["no placeholder"], ["two {} {}"], ["stray {0} {}"], [3]):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        assert ex2.templates_problem(str(tmp_path / "bad.json")) is not None
    (tmp_path / "broken.json").write_text("[\"Describe a {}.\"")
    assert "not a readable JSON file" in ex2.templates_problem(str(tmp_path / "broken.json"))


def test_load_lm_gives_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="save_pretrained"):
        load_lm(str(tmp_path / "missing"))


def test_stricter_judge_exercise_is_computed_from_the_run(tiny_world, monkeypatch):
    """The exercise's solution comes from judging the run's descriptions: changing its parameter changes it."""
    spec, texts = _world_texts(tiny_world)
    df = pd.DataFrame({"class_index": 0, "class_name": spec.name, "description": texts, "reward": 0.1})
    monkeypatch.setattr(ex2, "pipeline", lambda ch, progress=True, **changes: {
        "describe": lambda stage, max_new_tokens=None: df, "curve": [{"reward": 0.0}, {"reward": 0.5}]})

    class FakeChapter:
        world, params = tiny_world, {"judge_min_true": 1}

    base = ex2.exercise_stricter_judge(FakeChapter())
    strict = ex2.exercise_stricter_judge(FakeChapter(), judge_min_true=2)
    assert base["share spurious"] == pytest.approx(0.2)
    assert strict["share spurious"] >= base["share spurious"] + 0.2 - 1e-9  # at least the one-fact habitat text
    assert base["share false"] == strict["share false"] == pytest.approx(0.2)  # the truth does not move
    assert base["reward rise (GRPO)"] == pytest.approx(0.5)


def test_parameters_cell_states_the_declared_defaults():
    from pathlib import Path

    from conceptlab.chapter import SHARED, parameters_cell

    source = (Path(__file__).parents[1] / "notebooks" / "04_ex2.py").read_text()
    cell = source.split('# %% tags=["parameters", "hide-cell"]')[1].split("# %%")[0]
    namespace: dict = {}
    exec(cell, namespace)  # noqa: S102  (the notebook's own parameters cell)
    declared = parameters_cell({**SHARED, **ex2.PARAMETERS})
    assert {k: namespace[k] for k in declared} == declared
    assert set(namespace) - {"__builtins__"} == set(declared)
