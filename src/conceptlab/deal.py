"""DEAL: fine-tune a CLIP so that its concept explanations are disentangled and localized.

Loss of a batch (METHODS.md §1): ``L = L_ctr + λ_sep L_sep + λ_con L_con + λ_spa L_spa`` where the
maps of each image's K class descriptors and of its class name come from :mod:`conceptlab.explain`
(batched, differentiable), min-max normalised. The training loop runs through ``accelerate``
(device placement, backward, gradient sync), so the same code runs on a CPU, one GPU or several.
It checkpoints atomically and resumes; the data of step t depends only on ``(seed, t)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .artifacts import TrainingRun
from .descriptors import descriptor_sentence, rich_label
from .explain import explain_with_features, minmax
from .metrics import consistency_loss, separation_loss, sparsity_loss

Batches = Callable[[int], tuple[torch.Tensor, np.ndarray]]  # step -> (preprocessed images, labels)


@dataclass(frozen=True)
class DealConfig:
    """DEAL hyper-parameters; the defaults are the original's (Adam, ImageNet lr and batch, 5000 steps)."""

    lambda_sep: float = 0.05
    lambda_con: float = 0.01
    lambda_spa: float = 0.0005
    lr: float = 5e-7
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.001
    batch_size: int = 256
    steps: int = 5000
    n_concepts: int = 5
    start_layer: int | None = None  # ViT relevance start block; None = last block only
    text_augmentation: bool = True
    freeze_text: bool = False
    eval_mode: bool = False
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        problems = [f"{k}={getattr(self, k)} must be positive" for k in
                    ("lr", "batch_size", "steps", "n_concepts", "checkpoint_every") if getattr(self, k) <= 0]
        problems += [f"{k}={getattr(self, k)} must be >= 0" for k in ("lambda_sep", "lambda_con", "lambda_spa")
                     if getattr(self, k) < 0]
        if problems:
            raise ValueError("Bad DealConfig: " + "; ".join(problems) + ".")


def _text_parameters(model: nn.Module) -> list[nn.Parameter]:
    visual = {id(p) for p in model.visual.parameters()}
    return [p for name, p in model.named_parameters() if id(p) not in visual and name != "logit_scale"]


class DealObjective(nn.Module):
    """The DEAL losses of a batch as a module, so that ``accelerator.prepare`` can wrap it (DDP)."""

    def __init__(self, model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                 descriptors: dict[str, list[str]], cfg: DealConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        k = cfg.n_concepts
        short = [c for c in class_names if len(descriptors[c]) < k]
        if short:
            raise ValueError(f"Classes {short[:5]} have fewer than n_concepts={k} descriptors.")
        concept_texts = [descriptor_sentence(c, d) for c in class_names for d in descriptors[c][:k]]
        class_texts = list(class_names)
        label_texts = [rich_label(c, descriptors[c][:k]) for c in class_names] if cfg.text_augmentation \
            else class_texts
        # tokens: (C, K+1, ctx) for maps (K concepts then the class name) and (C, ctx) for the contrastive loss
        concepts = tokenizer(concept_texts).view(len(class_names), k, -1)
        self.register_buffer("map_tokens", torch.cat([concepts, tokenizer(class_texts)[:, None]], 1), persistent=False)
        self.register_buffer("label_tokens", tokenizer(label_texts), persistent=False)

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_text):
            return F.normalize(self.model.encode_text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, k = self.cfg, self.cfg.n_concepts
        classes, inverse = labels.unique(return_inverse=True)  # duplicates share one text
        map_text = self._encode_text(self.map_tokens[classes].flatten(0, 1)).view(len(classes), k + 1, -1)
        raw_maps, img = explain_with_features(self.model, images, map_text[inverse], cfg.start_layer, create_graph=True)
        maps, img = minmax(raw_maps), F.normalize(img, dim=-1)
        txt = self._encode_text(self.label_tokens[classes])
        logits = self.model.logit_scale.exp() * img @ txt.T  # (B, classes in batch)
        # Symmetric contrastive loss. The original pairs image i with text i and treats every other text
        # as a negative; with repeated classes in a batch (always, on a 16-class world) that would push an
        # image away from its own class text, so duplicates share one text: image -> its class, class -> the
        # uniform distribution over its images. Identical to the original when a batch has no repeats.
        member = (inverse[None, :] == torch.arange(len(classes), device=labels.device)[:, None]).float()
        ctr = 0.5 * (F.cross_entropy(logits, inverse) +
                     -(member / member.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean())
        sep = separation_loss(maps[:, :k])
        con = consistency_loss(maps[:, :k], maps[:, k])
        spa = sparsity_loss(maps[:, :k])
        total = ctr + cfg.lambda_sep * sep + cfg.lambda_con * con + cfg.lambda_spa * spa
        return {"loss": total, "contrastive": ctr, "separation": sep, "consistency": con, "sparsity": spa}


def train_deal(model: nn.Module, tokenizer: Callable, class_names: Sequence[str], descriptors: dict[str, list[str]],
               batches: Batches, cfg: DealConfig, out_dir: str | Path, progress: bool = True,
               accelerator=None) -> list[dict]:
    """Fine-tune ``model`` in place with DEAL; writes ``model.pt`` and ``history.json`` into ``out_dir``.

    ``batches(step)`` returns that step's preprocessed images and labels (the same for a resumed run).
    Resumes from ``out_dir/state.pt`` when an earlier run was interrupted.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    if cfg.freeze_text:
        for p in _text_parameters(model):
            p.requires_grad_(False)
    objective = DealObjective(model, tokenizer, class_names, descriptors, cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas,
                           eps=cfg.eps, weight_decay=cfg.weight_decay)  # the original's Adam (L2 weight decay)
    run = TrainingRun(out_dir, model, opt, writes=accelerator.is_main_process)
    objective, opt = accelerator.prepare(objective, opt)
    objective.train()
    if cfg.eval_mode:
        model.eval()  # frozen normalisation statistics (BatchNorm in ResNets), no dropout
    bar = tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps, desc="DEAL",
               disable=not progress or not accelerator.is_main_process)
    with run.checkpoint_on_interrupt():
        for step in bar:
            images, labels = batches(step)
            losses = objective(images.to(accelerator.device), torch.as_tensor(labels, device=accelerator.device))
            opt.zero_grad(set_to_none=True)
            accelerator.backward(losses["loss"])
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            run.history.append({"step": step, **{k: v.item() for k, v in losses.items()}})
            bar.set_postfix(loss=f"{run.history[-1]['loss']:.3f}", sep=f"{run.history[-1]['separation']:.2f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                run.checkpoint()
    run.finish(config=asdict(cfg))
    model.eval()
    return run.history


def array_batches(images: torch.Tensor | np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                  to_tensor: Callable[[np.ndarray], torch.Tensor] | None = None) -> Batches:
    """``batches(step)``: a seeded random batch of a fixed training set (uint8 arrays need ``to_tensor``)."""
    if batch_size > len(labels):
        raise ValueError(f"batch_size={batch_size} exceeds the {len(labels)} training images.")

    def batches(step: int) -> tuple[torch.Tensor, np.ndarray]:
        idx = np.sort(np.random.default_rng([seed, step]).choice(len(labels), size=batch_size, replace=False))
        chunk = images[idx]
        return (to_tensor(chunk) if to_tensor else chunk), labels[idx]

    return batches


def deal_clip(store, key: dict, model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
              descriptors: dict[str, list[str]], batches: Batches, cfg: DealConfig, progress: bool = True):
    """A DEAL fine-tuned copy of ``model``: loaded from the store or trained there. Returns (model, history).

    ``key`` must say what the base model and the training images are (it keys the artifact with the
    class names, descriptors and ``cfg``).
    """
    import copy
    import json

    from .models import load_weights

    params = {"base": key, "classes": list(class_names), "descriptors": descriptors, "config": asdict(cfg)}
    tuned = copy.deepcopy(model)
    with store.building("deal", params) as d:  # two kernels asking for the same run train it once
        if (d / "model.pt").exists():
            load_weights(tuned, d / "model.pt")
        else:
            train_deal(tuned, tokenizer, class_names, descriptors, batches, cfg, d, progress=progress)
    return tuned.eval(), json.loads((d / "history.json").read_text())


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Callable, images: torch.Tensor, labels: np.ndarray,
             class_names: Sequence[str], descriptors, n_concepts: int = 5, part_masks: np.ndarray | None = None,
             start_layer: int | None = None, batch_size: int = 32, original_indexing: bool = False,
             n_localize: int | None = None, progress: bool = False) -> tuple[dict[str, float], torch.Tensor]:
    """DEAL's evaluation of ``model`` on preprocessed ``images``, plus ground truth where ``part_masks`` exist.

    ``descriptors`` is a DescriptorSet; the first ``n_concepts`` of each image's class are explained.
    ``part_masks`` (N, K, H, W): the mask of the part each descriptor is about (empty: no part).
    Localizability (K x 5 forward passes per image) uses the first ``n_localize`` images (None: all).
    Returns (metrics, maps (N, K, h, w)).
    """
    from .descriptors import description_logits, descriptor_text_features
    from .explain import explain
    from .metrics import (
        disentanglability,
        energy_in_mask,
        localizability,
        overlap_agreement,
        pointing_game,
        separation_loss,
    )
    from .models import class_text_weights, topk_accuracy

    dev = next(model.parameters()).device
    table = {c: descriptors.descriptors[c][:n_concepts] for c in class_names}
    concept_feats = descriptor_text_features(model, tokenizer, table, class_names, n_concepts).to(dev)
    encode = lambda x: F.normalize(model.encode_image(x).float(), dim=-1)  # noqa: E731
    maps, seps, locs, feats = [], [], [], []
    for s in tqdm(range(0, len(images), batch_size), disable=not progress, desc="evaluate"):
        x, texts = images[s:s + batch_size].to(dev), concept_feats[torch.as_tensor(labels[s:s + batch_size])]
        m = explain(model, x, texts, start_layer)
        seps += [separation_loss(m[i:i + 1]).item() for i in range(len(m))]
        if n_localize is None or s < n_localize:
            keep = len(x) if n_localize is None else min(len(x), n_localize - s)
            locs.append(localizability(encode, x[:keep], m[:keep], texts[:keep], original_indexing=original_indexing))
        feats.append(encode(x).cpu())
        maps.append(m.cpu())
    maps, feats = torch.cat(maps), torch.cat(feats)
    zero_shot = feats @ class_text_weights(model, tokenizer, class_names).T
    by_description = description_logits(feats, model, tokenizer, table, class_names)
    out = {"disentanglability": disentanglability(seps), "localizability": torch.cat(locs).mean().item(),
           "n_localize": len(torch.cat(locs)),
           "separation_loss": float(np.mean(seps)), "top1": topk_accuracy(zero_shot, labels, 1),
           "top5": topk_accuracy(zero_shot, labels, 5), "description_top1": topk_accuracy(by_description, labels, 1)}
    if part_masks is not None:
        overlap = overlap_agreement(maps, part_masks)
        same = overlap["mask_overlap"] > 0
        out.update({"pointing_game": float(np.nanmean(pointing_game(maps, part_masks).numpy())),
                    "energy_in_mask": float(np.nanmean(energy_in_mask(maps, part_masks).numpy())),
                    "map_overlap_same_part": float(overlap["map_overlap"][same].mean()) if same.any() else float("nan"),
                    "map_overlap_other_part": float(overlap["map_overlap"][~same].mean())})
    return out, maps


@dataclass
class EvalSet:
    """Model inputs, labels, images for display and (Concept World only) part masks of a chapter's data."""

    images: torch.Tensor  # preprocessed (N, 3, S, S)
    labels: np.ndarray
    display: np.ndarray  # uint8 (N, H, W, 3)
    class_names: list[str]
    masks: np.ndarray | None = None  # (N, parts, H, W) bool on Concept World


def load_eval_set(model: nn.Module, preprocess: Callable, n: int, dataset: str = "world", data_root: str | None = None,
                  split: str = "test", world=None, seed: int = 0, start: int = 0) -> EvalSet:
    """``n`` images of Concept World (``dataset="world"``) or of a real data set (``imagefolder``/``cub``)."""
    from .data import load_dataset, load_images
    from .models import images_to_tensor

    if dataset == "world":
        if world is None:
            raise ValueError("dataset='world' needs the ConceptWorld.")
        batch = world.sample(n, split, start=start)
        return EvalSet(images_to_tensor(batch.images, model), batch.labels, batch.images, world.class_names,
                       batch.masks)
    if data_root is None:
        raise ValueError(f"dataset={dataset!r} needs data_root=<folder>.")
    data = load_dataset(dataset, data_root, split if dataset == "cub" else "test").subset(n, seed)
    images, display = load_images(data.paths, preprocess, size=224)
    return EvalSet(images, data.labels, display, data.class_names)
