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
from conceptlab.chapters import ex2 as chapter4
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
from conceptlab.stats import bootstrap_interval
from conceptlab.textlm import (
    WorldLMConfig,
    answer_loss,
    answer_sentence,
    encode_documents,
    lm_load_kwargs,
    load_lm,
    sequence_logprobs,
    tiny_llama,
    word_tokenizer,
    world_corpus,
    world_lm,
)

TINY_LM = WorldLMConfig(
    n_classes=6, corpus_size=400, fact_sheets=4, steps=40, batch_size=16, hidden=32, n_layer=2, n_head=2
)


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
    texts = [
        "a zorbil with a large red head.",
        "click to enlarge photo of a quillfin",
        "the mossback lives in the ocean.",
    ]
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
    docs = world_corpus(cfg, ex2.TEMPLATES)
    assert len(docs) == 60 + cfg.fact_sheets * 6
    for query, answer in docs[cfg.fact_sheets * 6 :]:
        assert query.endswith("\n\n")
        c = next(k for k, n in enumerate(tiny_world.class_names) if n in query)
        label = judge.label(c, answer)
        assert label["type"] == "habitat" and label["habitat_true"] and not label["visual"]
    with pytest.raises(ValueError, match="unknown kinds"):
        WorldLMConfig(answer_mix={"colour": 1.0})


def test_word_tokenizer_round_trips_answers_and_the_loss_covers_the_answer_only():
    docs = world_corpus(WorldLMConfig(n_classes=6, corpus_size=80, fact_sheets=1), ex2.TEMPLATES)
    tok = word_tokenizer(ex2.TEMPLATES)
    assert all(tok.decode(tok.encode(a, add_special_tokens=False)) == a for _, a in docs)
    assert tok.unk_token_id not in {i for q, a in docs for i in tok.encode(q + a, add_special_tokens=False)}
    ids, labels = encode_documents(docs[:3], tok)
    for row, (query, answer) in enumerate(docs[:3]):
        n_query = len(tok.encode(query, add_special_tokens=False))
        n_answer = len(tok.encode(answer, add_special_tokens=False)) + 1  # and EOS
        assert (labels[row, :n_query] == -100).all()
        assert labels[row, n_query : n_query + n_answer].tolist() == ids[row, n_query : n_query + n_answer].tolist()
        assert (labels[row, n_query + n_answer :] == -100).all()


def test_the_length_split_loss_is_the_padded_batchs_loss_and_gradient():
    cfg = WorldLMConfig(n_classes=6, corpus_size=60, fact_sheets=2, hidden=32, n_layer=2, n_head=2)
    tok = word_tokenizer(ex2.TEMPLATES)
    ids, labels = encode_documents(world_corpus(cfg, ex2.TEMPLATES), tok)
    mask = (ids != tok.pad_token_id).long()
    assert mask.sum(1).min() < mask.sum(1).max() - 10, "the split needs rows of different lengths"
    torch.manual_seed(0)
    model = tiny_llama(cfg, tok)
    grads = []
    for loss_of in (
        lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss,  # transformers' own, one batch
        lambda: answer_loss(model, ids, mask, labels, split=True),
    ):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (whole, g_whole), (split, g_split) = grads
    assert split == pytest.approx(whole, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_whole, g_split))
    with pytest.raises(ValueError, match="split_by_length"):
        WorldLMConfig(split_by_length=1)


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
    texts = [
        f"a {spec.name} with a {attrs['size']} {attrs['colour']} {part}.",
        f"{spec.name} stock photo",
        f"the {spec.name} lives in the {spec.habitat}.",
    ]
    assert judge.ask(INFORMATIVE, [spec.name] * 3, texts) == ["yes", "no", "yes"]
    assert judge.ask(ATTRIBUTE, [spec.name] * 3, texts) == ["colour", "other", "habitat"]
    with pytest.raises(ValueError, match="unknown"):
        judge.ask(INFORMATIVE, ["no-such-class"], ["text"])


def _world_texts(world):
    """One description of each kind for class 0: true visual, false visual, true habitat, spurious, one fact."""
    spec = world.classes[0]
    rng = np.random.default_rng(1)
    part, attrs = next(iter(spec.parts.items()))
    return spec, [
        answer_sentence("visual_true", spec, rng),
        answer_sentence("visual_false", spec, rng),
        f"the {spec.name} lives in the {spec.habitat}.",
        f"click to enlarge photo of a {spec.name}.",
        f"the {spec.name} has a {attrs['colour']} {part} and lives in the {spec.habitat}.",
    ]


def test_inspection_keeps_false_descriptions_out_of_spurious(tiny_world):
    spec, texts = _world_texts(tiny_world)
    df = pd.DataFrame({"class_index": 0, "class_name": spec.name, "description": texts})
    out = ex2.inspect_descriptions(df, WorldJudge(tiny_world), tiny_world)
    assert out.kind.tolist() == ["visual", "false", "non-visual", "spurious", "visual"]
    shares = ex2.kind_shares(out)
    assert shares["false"] == pytest.approx(0.2) and shares["spurious"] == pytest.approx(0.2)
    assert list(shares.index) == list(ex2.KINDS)

    # a judge that calls everything uninformative still cannot make the false one spurious
    class No:
        def ask(self, question, names, texts):
            return ["no"] * len(texts)

    assert ex2.inspect_descriptions(df, No(), tiny_world).kind.tolist() == [
        "spurious",
        "false",
        "spurious",
        "spurious",
        "spurious",
    ]
    # a stricter world judge (two true facts) moves the one-fact descriptions to spurious, not the two-fact one
    strict = ex2.inspect_descriptions(df, WorldJudge(tiny_world, min_true=2), tiny_world)
    assert strict.kind.tolist()[2:] == ["spurious", "spurious", "visual"]


def test_inspection_sorts_attribute_types_on_real_data():
    class Scripted:
        answers = {"informative": ["yes", "no", "yes", None], "attribute": ["colour", "habitat"]}

        def ask(self, question, names, texts):
            assert len(texts) == len(self.answers[question.name])
            return self.answers[question.name]

    df = pd.DataFrame({"class_name": ["red finch"] * 4, "description": ["a", "b", "c", "d"]})
    out = ex2.inspect_descriptions(df, Scripted())
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
    tok = word_tokenizer([INFORMATIVE.template, '{"answer": "yes"} {"answer": "no"} Yes No maybe assistant:'])
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
    assert ex2.inspect_descriptions(df, judge).kind.tolist() == ["unparsed", "spurious", "unparsed", "unparsed"]


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
    namespace = {
        "judge": "openai:m@http://127.0.0.1:9/v1",
        "judge_api_key_env": "EX2_NO_KEY",
        "templates": None,
        "artifacts_dir": "/nonexistent/never-used",
    }
    with pytest.raises(ParameterError, match="EX2_NO_KEY"):
        setup("04_ex2", namespace, chapter4.PARAMETERS)


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
    assert (
        len(q) == 2 * 6
        and q.prompt[1]
        == f"Compare and contrast the visual characteristics of different {tiny_world.class_names[0]}.\n\n"
    )
    for bad in ({"a": "{}"}, [], ["no placeholder"], ["two {} {}"], ["stray {0} {}"], [3]):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        assert ex2.templates_problem(str(tmp_path / "bad.json")) is not None
    (tmp_path / "broken.json").write_text('["Describe a {}."')
    assert "not a readable JSON file" in ex2.templates_problem(str(tmp_path / "broken.json"))


def test_load_lm_gives_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="save_pretrained"):
        load_lm(str(tmp_path / "missing"))


def test_parameters_cell_states_the_declared_defaults():
    from pathlib import Path

    from conceptlab.chapter import SHARED, parameters_cell

    source = (Path(__file__).parents[1] / "notebooks" / "04_ex2.py").read_text()
    cell = source.split('# %% tags=["parameters", "hide-cell"]')[1].split("# %%")[0]
    namespace: dict = {}
    exec(cell, namespace)  # noqa: S102  (the notebook's own parameters cell)
    declared = parameters_cell({**SHARED, **chapter4.PARAMETERS})
    assert {k: namespace[k] for k in declared} == declared
    assert set(namespace) - {"__builtins__"} == set(declared)


# ---------------------------------------------------------------------------- issue 18: a mechanism that shows
def test_knowledge_gate_stops_an_untrained_lm(tiny_world):
    tok = word_tokenizer(ex2.TEMPLATES)
    torch.manual_seed(0)
    untrained = tiny_llama(TINY_LM, tok).eval()
    queries = ex2.format_queries(tiny_world.class_names)
    # an untrained LM writes random words: few claims, and those mostly false
    said = ex2.sample_descriptions(untrained, tok, queries.iloc[:30], 2, max_new_tokens=12, seed=0)
    labelled = WorldJudge(tiny_world).label_frame(said)
    with pytest.raises(ex2.KnowledgeGateError, match="knows too little"):
        ex2.knowledge_gate(labelled, 0.9)
    # the world's own true sentences pass it, and the random-class baseline of the same sentences does not
    rng = np.random.default_rng(0)
    true = pd.DataFrame(
        [
            {"class_index": c, "description": answer_sentence("visual_true", spec, rng)}
            for c, spec in enumerate(tiny_world.classes)
            for _ in range(5)
        ]
    )
    assert ex2.knowledge_gate(WorldJudge(tiny_world).label_frame(true), 0.9) == 1.0
    assert ex2.random_class_truth(true, tiny_world) < 0.5


def test_a_prompt_padded_two_ways_gets_the_same_logprobs():
    """Rotary positions: trl scores completions left-padded, without position_ids; the padding must not matter."""
    tok = word_tokenizer(ex2.TEMPLATES)
    torch.manual_seed(0)
    model = tiny_llama(TINY_LM, tok).eval()
    prompt, completion = "Describe a photo of a zorbil.\n\n", "the zorbil has a large red head."
    alone = sequence_logprobs(model, tok, [prompt], [completion])
    long_prompt = "Write a field guide entry for a quillfin and describe the composition of it.\n\n"
    padded = sequence_logprobs(model, tok, [prompt, long_prompt], [completion, "a quillfin."])
    more = sequence_logprobs(model, tok, [long_prompt + long_prompt, prompt], ["a quillfin.", completion])
    assert torch.allclose(alone[0], padded[0], atol=1e-4) and torch.allclose(alone[0], more[1], atol=1e-4)


def test_the_paired_gain_pairs_the_same_slots():
    rng = np.random.default_rng(0)
    before = pd.DataFrame(
        [
            {"class_index": c, "template_index": t, "sample": k, "reward": rng.normal()}
            for c in range(4)
            for t in range(5)
            for k in range(2)
        ]
    )
    after = before.assign(reward=before.reward + 0.1 + 0.01 * rng.normal(size=len(before)))
    gain, low, high = ex2.paired_gain(before, after)
    assert gain == pytest.approx((after.reward - before.reward).mean()) and low < gain < high and low > 0.05
    # rows in another order are paired by their slot, not by their position
    assert ex2.paired_gain(before, after.sample(frac=1.0, random_state=1))[0] == pytest.approx(gain)
    with pytest.raises(ValueError, match="same"):
        ex2.paired_gain(before, after.iloc[1:])
    with pytest.raises(ValueError, match="same"):
        ex2.paired_gain(before, after.assign(sample=after["sample"] + 1))


def test_the_null_pools_every_further_draw_per_slot():
    """The aligned LM is compared with the mean of the pretrained LM's further draws on each slot: one lucky
    draw moves the null by a third, not fully, and draws in any row order pool by their slot."""
    from conceptlab.chapters.ex2 import Result

    rng = np.random.default_rng(0)
    slots = [{"class_index": c, "template_index": t, "sample": k} for c in range(3) for t in range(4) for k in range(2)]
    before = pd.DataFrame([{**s, "reward": rng.normal()} for s in slots])
    draws = [before.assign(reward=before.reward + shift) for shift in (0.0, 0.0, 0.3)]
    pooled = ex2.pooled_draws([draws[0], draws[1].sample(frac=1.0, random_state=2), draws[2]])
    assert pooled.set_index(list(ex2.PAIR_KEYS)).reward.sub(
        before.set_index(list(ex2.PAIR_KEYS)).reward
    ).abs().max() == (pytest.approx(0.1))
    r = Result(descriptions={"before": before, "after": before.assign(reward=before.reward + 0.5)}, resampled=draws)
    g = r.gain()
    assert g["null"] == pytest.approx(0.1) and g["over_resampled"] == pytest.approx(0.4)
    assert g["null_draws"] == 3 and g["pretrained_draw_means"][3] == pytest.approx(before.reward.mean() + 0.3)
    with pytest.raises(ValueError, match="same"):
        ex2.pooled_draws([before, before.iloc[1:]])


def test_reweighted_kind_shares_is_the_pretrained_mix_at_large_beta_and_the_best_description_at_small(tiny_world):
    """π* on descriptions: with β large nothing is reweighted (the pretrained mix); with β small each class's
    mix is that of its best-rewarded description."""
    sentences = ex2.kind_sentences(tiny_world, per_kind=2, seed=0)
    descriptions = sentences.rename(columns={"sentence": "description"}).reset_index(drop=True)
    descriptions["reward"] = np.where(descriptions.kind == "habitat", 1.0, 0.0) + 0.001 * np.arange(len(descriptions))
    pooled = ex2.sentence_kind_shares(descriptions, tiny_world)
    assert np.allclose(ex2.reweighted_kind_shares(descriptions, tiny_world, beta=1e6), pooled)
    best = descriptions.loc[descriptions.groupby("class_index").reward.idxmax()]
    sharp = ex2.reweighted_kind_shares(descriptions, tiny_world, beta=1e-4)
    assert np.allclose(sharp, ex2.sentence_kind_shares(best, tiny_world), atol=1e-6)
    assert sharp["habitat"] > 0.9 and pooled["habitat"] < 0.3


def test_the_chapter_pairs_before_and_after_on_the_same_samples(tiny_lm, tiny_world):
    model, tok, _ = tiny_lm
    q = ex2.format_queries(tiny_world.class_names).iloc[:10]
    a = ex2.sample_descriptions(model, tok, q, 3, max_new_tokens=6, seed=0)
    b = ex2.sample_descriptions(model, tok, q, 3, max_new_tokens=6, seed=0)
    assert len(a) == 30 and sorted(a["sample"].unique()) == [0, 1, 2]
    keys = list(ex2.PAIR_KEYS)
    assert a[keys].equals(b[keys]) and a.description.tolist() == b.description.tolist()


def test_a_planted_vlm_scores_the_chapters_own_before_samples(tiny_lm, tiny_clip, tiny_world):
    """The planted section rescores the chapter's "before" samples instead of drawing them again: sampling
    does not see the reward, so a fresh draw scored by the other VLM is the same frame."""
    model, tok, _ = tiny_lm
    clip, _, tokenizer, _ = tiny_clip
    q = ex2.format_queries(tiny_world.class_names).iloc[:12]
    means = ex2.world_class_embeddings(clip, tiny_world, 8)
    chapters_vlm, other_vlm = ex2.CLIPReward(clip, tokenizer, means), ex2.CLIPReward(clip, tokenizer, means.flip(0))
    before = ex2.sample_descriptions(model, tok, q, 2, max_new_tokens=6, seed=0)
    before["reward"] = chapters_vlm.scores(before.description.tolist(), before.class_index.tolist())
    kept = before.copy()
    fresh = ex2.sample_descriptions(model, tok, q, 2, max_new_tokens=6, seed=0)
    fresh["reward"] = other_vlm.scores(fresh.description.tolist(), fresh.class_index.tolist())
    rescored = chapter4.rescored(before, other_vlm)
    pd.testing.assert_frame_equal(rescored, fresh)
    pd.testing.assert_frame_equal(before, kept)  # the chapter's own samples keep their rewards
    assert not np.allclose(rescored.reward, before.reward)


def test_balanced_prompts_give_every_step_different_classes(tiny_world):
    q = ex2.format_queries(tiny_world.class_names)
    prompts = ex2.balanced_prompts(q, steps=9, prompts_per_step=3, seed=0)
    assert len(prompts) == 27
    steps = prompts.class_index.to_numpy().reshape(9, 3)
    assert all(len(set(s)) == 3 for s in steps)
    assert set(np.bincount(prompts.class_index, minlength=6)) <= {4, 5}  # every class about equally often
    assert prompts.equals(ex2.balanced_prompts(q, steps=9, prompts_per_step=3, seed=0))


def test_relative_reward_subtracts_each_class_baseline(tiny_clip, tiny_world):
    clip, _, clip_tok, _ = tiny_clip
    reward = ex2.CLIPReward(clip, clip_tok, ex2.world_class_embeddings(clip, tiny_world, per_class=8))
    texts, classes = ["a zorbil.", "a quillfin.", "a zorbil."], [0, 1, 0]
    raw = reward.scores(texts, classes)
    frame = pd.DataFrame({"class_index": [0, 1, 2, 3, 4, 5], "reward": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]})
    relative = reward.relative_to(ex2.class_baseline(frame, 6))
    assert relative(prompts=[""] * 3, completions=texts, class_index=classes) == pytest.approx(
        (raw - np.array([0.1, 0.2, 0.1])).tolist(), abs=1e-6
    )
    with pytest.raises(ValueError, match="no descriptions"):
        ex2.class_baseline(frame.iloc[:5], 6)


def test_optimal_mix_follows_the_kl_regularised_optimum():
    ref = pd.Series({"a": 0.5, "b": 0.3, "c": 0.2, "d": 0.0})
    reward = pd.Series({"a": 0.0, "b": 0.1, "c": 0.2, "d": 1.0})
    mix = ex2.optimal_mix(ref, reward, beta=0.1)
    by_hand = ref * np.exp(reward / 0.1)
    assert mix.to_dict() == pytest.approx((by_hand / by_hand.sum()).to_dict())
    assert mix["d"] == 0  # RL cannot reach what the reference never writes
    assert ex2.optimal_mix(ref, reward, beta=1e6).to_dict() == pytest.approx(ref.to_dict())
    assert ex2.optimal_mix(ref, reward, beta=0.1, scale=2.0)["c"] < mix["c"]  # a larger unit: a weaker pull


def test_kind_preference_is_paired_per_class(tiny_clip, tiny_world):
    clip, _, clip_tok, _ = tiny_clip
    reward = ex2.CLIPReward(clip, clip_tok, ex2.world_class_embeddings(clip, tiny_world, per_class=8))
    pref = ex2.kind_preference(reward, tiny_world, per_kind=4)
    assert len(pref) == 6 * 7 * 4 and pref.groupby(["kind", "class_index"]).size().eq(4).all()
    table = ex2.kind_table(pref)
    assert table.loc["class", "minus class"] == pytest.approx(0.0) and table.loc["class", "low"] == pytest.approx(0.0)
    per_class = pref.pivot_table(index="class_index", columns="kind", values="reward")
    diff = (per_class["habitat"] - per_class["class"]).mean()
    assert table.loc["habitat", "minus class"] == pytest.approx(diff)
    assert table.loc["habitat", "low"] <= diff <= table.loc["habitat", "high"]


def test_sentence_kinds_tell_seen_from_unseen_web_phrases(tiny_world):
    judge = WorldJudge(tiny_world)
    spec = tiny_world.classes[0]
    rng = np.random.default_rng(0)
    for kind in ("visual_true", "visual_false", "habitat", "behaviour", "class", "web_seen", "web_unseen"):
        for _ in range(5):
            assert judge.sentence_kind(0, answer_sentence(kind, spec, rng)) == kind
    other = next(h for h in ("forest", "desert", "ocean") if h != spec.habitat)
    assert judge.sentence_kind(0, f"the {spec.name} lives in the {other}.") == "other"
    df = pd.DataFrame(
        {
            "class_index": [0, 0],
            "description": [
                f"click to enlarge photo of a {spec.name}. the {spec.name} lives in the {spec.habitat}.",
                f"see all 24 photos of the {spec.name}.",
            ],
        }
    )
    shares = ex2.sentence_kind_shares(df, tiny_world)
    assert shares["web_seen"] == shares["habitat"] == shares["web_unseen"] == pytest.approx(1 / 3)


def test_the_planted_pair_differs_in_one_setting_and_loads_chapter_7s_models(tmp_path, monkeypatch):
    """Chapter 4's planted CLIPs are chapter 7's (the same recipe parameters give the same models): per seed a
    shortcut and a no-shortcut model whose keys differ in the training world's habitat correlation only; the
    positive control's pair differs in the caption mix only."""
    from conceptlab import verdict as vd
    from conceptlab.chapter import ParameterError, setup
    from conceptlab.chapters import verdict as chapter7

    recipe = {"planted_steps": 2, "planted_n_train": 64, "planted_batch_size": 8}
    common = {"world": {"n_classes": 8}, "artifacts_dir": str(tmp_path), **recipe}
    ch = setup("04_ex2", {**common, "planted_seeds": 2}, chapter4.PARAMETERS)
    trained = []
    monkeypatch.setattr(vd, "world_clip", lambda store, cfg, train, progress: trained.append((cfg, train)) or _Bundle())
    subjects = chapter4.planted_subjects(ch)
    assert [(s.condition, s.seed) for s in subjects] == [(c, k) for c in ("no-shortcut", "shortcut") for k in (0, 1)]
    for seed in (0, 1):
        calm, shortcut = (
            next(s.key for s in subjects if s.seed == seed and s.condition == c) for c in ("no-shortcut", "shortcut")
        )
        assert calm["train"] == shortcut["train"]
        changed = [k for k in calm["world"] if calm["world"][k] != shortcut["world"][k]]
        assert changed == ["habitat_correlation"]
    ch7 = setup("07_verdict", {**common, "n_seeds": 2}, chapter7.PARAMETERS)
    assert trained[0][1] == chapter7.planted_recipe(ch7)  # chapter 7 trains (and stores) the same models
    assert [train.seed for _, train in trained] == [0, 1, 0, 1]
    positive = setup("04_ex2", {**common, "planted_condition": "habitat-unnamed"}, chapter4.PARAMETERS)
    calm, raised = (s.key["world"] for s in chapter4.planted_subjects(positive) if s.seed == 0)
    assert [k for k in calm if calm[k] != raised[k]] == ["caption_mix"]  # the positive control: the text only
    share = [w["caption_mix"]["habitat"] / sum(w["caption_mix"].values()) for w in (calm, raised)]
    assert share == pytest.approx([0.2, 0.0])
    with pytest.raises(ParameterError, match="planted_condition"):
        setup("04_ex2", {**common, "planted_condition": "habitat"}, chapter4.PARAMETERS)
    with pytest.raises(ParameterError, match="conditions"):  # the control is chapter 4's, not a verdict model
        setup(
            "07_verdict", {**common, "conditions": ["shortcut", "no-shortcut", "habitat-unnamed"]}, chapter7.PARAMETERS
        )
    world = chapter4.planted_reward_world(ch)
    assert world.class_names == ch.world.class_names[: vd.PLANTED_CLASSES]
    assert world.config.habitat_correlation == ch.world_cfg.habitat_correlation
    other = setup("04_ex2", {**common, "planted_reward_habitat": 0.0}, chapter4.PARAMETERS)
    assert chapter4.planted_reward_world(other).config.habitat_correlation == 0.0


class _Bundle(tuple):
    """What ``world_clip`` returns, for a test that must not train: ``(clip, preprocess, tokenizer, history)``."""

    def __new__(cls):
        return super().__new__(cls, (torch.nn.Identity(), None, None, []))


def test_the_planted_comparison_needs_classes_the_world_lm_knows(tmp_path):
    from conceptlab.chapter import ParameterError, setup

    with pytest.raises(ParameterError, match="planted=False"):
        setup("04_ex2", {"world": {"n_classes": 4}, "artifacts_dir": str(tmp_path)}, chapter4.PARAMETERS)
    ch = setup(
        "04_ex2", {"world": {"n_classes": 4}, "planted": False, "artifacts_dir": str(tmp_path)}, chapter4.PARAMETERS
    )
    assert ch.params["planted"] is False


def _preference(rng, n_classes=6, per_kind=8, raised=0.0):
    rows = [
        {"class_index": c, "kind": k, "reward": 0.6 + 0.01 * rng.normal() + (raised if k == "web_seen" else 0.0)}
        for c in range(n_classes)
        for k in ("class", "web_seen", "visual_true")
        for _ in range(per_kind)
    ]
    return pd.DataFrame(rows)


def test_planted_reward_differences_see_a_plant_that_took_and_not_one_that_did_not():
    rng = np.random.default_rng(0)
    control = _preference(rng)
    took = ex2.planted_reward_differences(control, _preference(rng, raised=0.05), "web_seen")
    assert len(took) == 6 and took.mean() == pytest.approx(0.05, abs=0.01) and (took > 0).all()
    assert (ex2.planted_reward_differences(control, control, "web_seen") == 0).all()
    flat = ex2.planted_reward_differences(control, _preference(rng), "web_seen").to_numpy()
    low, high = bootstrap_interval(flat)
    assert low < 0 < high


def _planted_result(world, shares: dict[tuple[str, int], float]) -> chapter4.Result:
    """A Result whose planted models wrote, after alignment, habitat sentences in ``shares`` of their 20
    slots per class and class-name sentences in the rest (before: class-name sentences only)."""
    rng = np.random.default_rng(0)
    models = {}
    for (condition, seed), share in shares.items():
        rows = {"before": [], "after": []}
        for c, spec in enumerate(world.classes):
            for t in range(20):
                slot = {"class_index": c, "template_index": t, "sample": 0, "class_name": spec.name}
                kind = "habitat" if t < round(20 * share) else "class"
                rows["before"].append({**slot, "description": answer_sentence("class", spec, rng)})
                rows["after"].append({**slot, "description": answer_sentence(kind, spec, rng)})
        models[f"{condition} {seed}"] = {
            "condition": condition,
            "seed": seed,
            **{stage: pd.DataFrame(v) for stage, v in rows.items()},
        }
    return chapter4.Result(planted={"world": world, "models": models, "pair": ("no-shortcut", "shortcut")})


def test_the_planted_difference_pairs_models_of_a_seed_and_spreads_over_seeds(tiny_world):
    shares = {("no-shortcut", 0): 0.1, ("shortcut", 0): 0.6, ("no-shortcut", 1): 0.2, ("shortcut", 1): 0.5}
    shares.update({("no-shortcut", 2): 0.0, ("shortcut", 2): 0.6})
    d = chapter4.planted_difference(_planted_result(tiny_world, shares))
    assert d["per_seed"] == pytest.approx([0.5, 0.3, 0.6])
    assert d["value"] == pytest.approx(0.4666667) and d["low"] < 0.3 and d["high"] > 0.6  # a t interval over 3 seeds
    same = chapter4.planted_difference(
        _planted_result(tiny_world, {(c, k): 0.3 for c in ("no-shortcut", "shortcut") for k in (0, 1)})
    )
    assert same["per_seed"] == [0.0, 0.0] and same["low"] == same["high"] == 0.0
    one = chapter4.planted_difference(_planted_result(tiny_world, {("no-shortcut", 0): 0.1, ("shortcut", 0): 0.6}))
    assert one["value"] == pytest.approx(0.5) and one["low"] < 0.5 < one["high"]  # one seed: over its slots
    assert d["band"]["low"] < 0 < d["band"]["high"] and d["band"]["high"] < 0.3  # the label-swap null
    assert same["band"] == {"mean": 0.0, "low": 0.0, "high": 0.0}  # equal shares on every slot: nothing to swap


def test_the_label_swap_band_is_the_null_of_a_paired_mean_and_a_finding_must_clear_it():
    rng = np.random.default_rng(1)
    noise = [rng.normal(0.0, 1.0, 200) for _ in range(3)]
    band = chapter4.label_swap_band(noise)
    assert band["low"] < 0 < band["high"] and band["high"] - band["low"] == pytest.approx(4 * 1 / np.sqrt(600), rel=0.2)
    shifted = chapter4.label_swap_band([d + 0.5 for d in noise])  # a sign flip erases any shift: the same width
    assert shifted["high"] - shifted["low"] == pytest.approx(band["high"] - band["low"], rel=0.3)
    assert abs(shifted["mean"]) < 0.05
    d = {"value": 0.05, "low": 0.01, "high": 0.09}
    assert chapter4.clears(d) and not chapter4.clears({**d, "low": -0.01})
    assert not chapter4.clears({**d, "band": {"mean": 0.0, "low": -0.06, "high": 0.06}})  # inside its null
    assert chapter4.clears({**d, "band": {"mean": 0.0, "low": -0.04, "high": 0.04}})


def test_the_planted_reading_follows_the_plant_the_reward_and_the_aligned_shares(tmp_path, monkeypatch):
    from conceptlab.chapter import setup

    ch = setup("04_ex2", {"world": {"n_classes": 6}, "artifacts_dir": str(tmp_path)}, chapter4.PARAMETERS)

    def interval(v, band=0.005):
        null = {"mean": 0.0, "low": -band, "high": band}
        return {"value": v, "low": v - 0.01, "high": v + 0.01, "per_seed": [v] * 3, "band": null}

    def took(gap, observed, reliance=1.0):
        return {
            "seeds": 3,
            "reward_images_habitat_correlation": 0.8,
            "reliance": interval(reliance),
            "reward_gap": interval(gap),
            "predicted": interval(gap),
            "observed": interval(observed),
        }

    cases = [
        (took(0.0, 0.3), "nothing for EX2 to recover"),
        (took(0.05, 0.0), "RL did not recover"),
        ({**took(0.05, 0.3), "observed": interval(0.3, band=0.4)}, "RL did not recover"),  # inside its null band
        ({**took(0.05, 0.3), "reward_gap": interval(0.05, band=0.1)}, "nothing for EX2 to recover"),
        (took(0.05, -0.3), "against the rewards"),
        (took(-0.05, -0.3), "does not follow what the VLM relies on"),
        (took(0.05, 0.3), "that is the way the measured reliance differs"),
        (took(0.05, 0.3, reliance=0.0), "the measured reliance does not differ"),  # the positive control
    ]
    one = took(-0.05, -0.3)
    one.update(seeds=1, reliance={"value": 1.0, "low": 1.0, "high": 1.0, "per_seed": [1.0]})
    cases.append((one, "one seed: the intervals are over its classes and slots"))
    pair = {"pair": ("no-shortcut", "shortcut")}
    for t, expected in cases:
        monkeypatch.setattr(chapter4, "plant_took", lambda ch, r, t=t: t)
        assert expected in chapter4.plant_sentence(ch, chapter4.Result(planted=pair))
    positive = chapter4.plant_sentence(ch, chapter4.Result(planted={"pair": ("no-shortcut", "habitat-unnamed")}))
    assert "the habitat-unnamed VLM's measured habitat reliance exceeds the no-shortcut VLM's" in positive


def test_run_on_world_aligns_any_world_clip_and_pairs_its_samples(tiny_lm, tiny_clip, tiny_world, tiny_store):
    clip, _, clip_tok, _ = tiny_clip
    cfg = ex2.AlignConfig(steps=2, num_generations=2, prompts_per_step=2, max_new_tokens=6, lr=1e-3)
    out = ex2.run_on_world(
        tiny_store, clip, clip_tok, {"tiny clip": 1}, tiny_world, TINY_LM, cfg, images_per_class=8, samples_per_query=1
    )
    keys = list(ex2.PAIR_KEYS)
    assert len(out["before"]) == 25 * 6 and out["before"][keys].equals(out["after"][keys])
    assert len(out["curve"]) == 2 and np.isfinite(ex2.paired_gain(out["before"], out["after"])[0])
    assert out["sentence_kinds"].sum().to_numpy() == pytest.approx([1.0, 1.0])


def test_prediction_agreement_stands_beside_its_permutation_band():
    """A prediction that is the observed change correlates at 1, beyond the band of permuted kinds; its
    mirror image at -1, below it; the band itself sits between."""
    from conceptlab.chapters.ex2 import prediction_agreement

    before = pd.Series(np.full(8, 0.125), index=list("abcdefgh"))
    change = np.array([0.05, -0.03, 0.02, -0.01, 0.04, -0.05, 0.0, -0.02])
    mix = pd.DataFrame({"before": before, "after": before + change, "predicted": before + change}).assign(
        **{"predicted from descriptions": before - change}
    )
    agreement = prediction_agreement(mix)
    same, mirror = agreement["predicted"], agreement["predicted from descriptions"]
    assert same["r"] == pytest.approx(1.0) and same["r"] > same["null_high"]
    assert mirror["r"] == pytest.approx(-1.0) and mirror["r"] < mirror["null_low"]
    assert -1 < same["null_low"] < 0 < same["null_high"] < 1


def test_stored_language_models_reload_without_progress_bars(tiny_lm, tiny_store, capfd):
    """The store's own small LMs reload silently (a chapter reloads them many times), and the user's
    progress-bar setting is back afterwards."""
    from transformers.utils import logging as hf_logging

    capfd.readouterr()
    world_lm(tiny_store, TINY_LM, ex2.TEMPLATES, progress=False)
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err
    assert hf_logging.is_progress_bar_enabled()
