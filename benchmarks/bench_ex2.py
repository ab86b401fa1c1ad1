"""EX2 reward throughput on one core: the batched reward against a per-description loop, same run;
and one pretraining step of the chapter's world LM (its default size and batch) with the batch split by
length (``WorldLMConfig.split_by_length``) against one padded batch, same run, all cores.

The loop is the definition written out: encode one description, take its cosine with each
cached image embedding of its class, average. The batched reward encodes all descriptions
at once and multiplies by the cached class means. Weights do not change the speed, so the
world CLIP architecture is used with random weights (no training, no files).
"""

import os

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from conceptlab.bench import figure, timed
from conceptlab.ex2 import CLIPReward
from conceptlab.models import encode_texts
from conceptlab.textlm import (
    WEB_PHRASES,
    WorldLMConfig,
    answer_loss,
    encode_documents,
    tiny_llama,
    word_tokenizer,
    world_corpus,
)
from conceptlab.world import CLASS_NAMES

N_CLASSES, PER_CLASS, N_DESCRIPTIONS = 16, 256, 256


def lm_step_seconds(split: bool, steps: int = 20) -> float:
    """Seconds per forward-backward-update of the world LM on the pretraining loop's batches."""
    from conceptlab.ex2 import TEMPLATES

    cfg = WorldLMConfig()
    tok = word_tokenizer(TEMPLATES)
    ids, labels = encode_documents(world_corpus(cfg, TEMPLATES), tok)
    mask = (ids != tok.pad_token_id).long()
    torch.manual_seed(0)
    model = tiny_llama(cfg, tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batches = [
        torch.randint(len(ids), (cfg.batch_size,), generator=torch.Generator().manual_seed(s)) for s in range(steps)
    ]

    def train() -> None:
        for idx in batches:
            opt.zero_grad(set_to_none=True)
            answer_loss(model, ids[idx], mask[idx], labels[idx], split=split).backward()
            opt.step()

    return timed(train, repeat=2) / steps


def run() -> list[dict]:
    padded, split = lm_step_seconds(False), lm_step_seconds(True)
    lm = figure(
        "world_lm_step_split_by_length",
        split,
        "s/step",
        baseline=padded,
        higher_is_better=False,
        baseline_kind="one padded batch",
    )
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    clip = open_clip.create_model("ConceptWorld-ViT").eval()
    tokenizer = open_clip.get_tokenizer("ConceptWorld-ViT")
    image_emb = F.normalize(torch.randn(N_CLASSES, PER_CLASS, clip.text_projection.shape[1]), dim=-1)
    rng = np.random.default_rng(0)
    classes = rng.integers(N_CLASSES, size=N_DESCRIPTIONS)
    texts = [WEB_PHRASES[i % len(WEB_PHRASES)].format(cls=CLASS_NAMES[c]) for i, c in enumerate(classes)]
    reward = CLIPReward(clip, tokenizer, image_emb.mean(1))

    def loop() -> list[float]:
        return [(image_emb[c] @ encode_texts(clip, tokenizer, [t])[0]).mean().item() for t, c in zip(texts, classes)]

    assert np.allclose(reward.scores(texts, classes), loop(), atol=1e-5)
    batched_s = timed(lambda: reward.scores(texts, classes), repeat=3)
    loop_s = timed(loop, repeat=1)
    return [
        lm,
        figure(
            "ex2_reward_batched",
            N_DESCRIPTIONS / batched_s,
            "descriptions/s",
            baseline=N_DESCRIPTIONS / loop_s,
            baseline_kind="per-description loop",
        ),
    ]
