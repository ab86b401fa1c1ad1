"""DEAL: fine-tune a CLIP so that its concept explanations are disentangled and localized.

Loss of a batch (METHODS.md §1): ``L = L_ctr + λ_sep L_sep + λ_con L_con + λ_spa L_spa``. The maps of
each image's K descriptors and of its bare class name come from :mod:`conceptlab.explain` (batched,
differentiable unless ``detach_maps``). L_sep and L_con use per-map min-max normalised maps and are
averaged over the batch; L_spa is the original's ``SparsityLoss`` (an image's K maps normalised
jointly, summed over the batch). The training loop runs through ``accelerate`` (CPU, one GPU or
several) and through :class:`conceptlab.training.TrainingRun` (resumable; the data of step t depends
only on ``(seed, t)``).

Where the original code departs from its paper, a field of :class:`DealConfig` or an argument of
:func:`evaluate` chooses; the defaults compute the paper's method (the chapter module
:mod:`conceptlab.chapters.deal` lists them as switches and reports the original code's variants).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .descriptors import CONCEPT_TEXTS, concept_text, rich_label
from .explain import explain, explain_with_features, minmax
from .metrics import consistency_loss, separation_loss, sparsity_loss
from .training import TrainingRun

Batches = Callable[[int], tuple[torch.Tensor, np.ndarray]]  # step -> (preprocessed images, labels)

# Localizability variants: (original pixel indexing, original image/map pairing).
LOCALIZABILITY = {
    "correct": (False, False),
    "original_indexing": (True, False),
    "original_indexing_pairing": (True, True),
}
ZERO_SHOT_PROMPTS = {"bare": ("{}",), "ensemble": ("a photo of a {}.", "a {}.")}
CONTRASTIVE = ("per_class", "per_image")


@dataclass(frozen=True)
class DealConfig:
    """DEAL hyper-parameters. Defaults: the original's ImageNet run (``run.sh``: λ_sep 0.1, λ_con 0.01,
    lr 5e-7, batch 256, 5000 steps, rich labels, ``--eval``); λ_spa 0.0005, Adam betas/eps/weight decay
    are ``train.py``'s defaults. Switches (see :data:`SWITCHES`): ``concept_text`` "bare" is the original
    code's; ``detach_maps`` False is the paper's (the original code detaches); ``contrastive``
    "per_class" is this book's (the original pairs image i with text i, "per_image")."""

    lambda_sep: float = 0.1
    lambda_con: float = 0.01
    lambda_spa: float = 0.0005
    lr: float = 5e-7
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.001
    batch_size: int = 256
    steps: int = 5000
    n_concepts: int = 5
    start_layer: int | None = None  # ViT relevance start block; None = last block only (the original's -1)
    text_augmentation: bool = True
    freeze_text: bool = False
    eval_mode: bool = True
    concept_text: str = "bare"
    detach_maps: bool = False
    contrastive: str = "per_class"
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [
            f"{k}={getattr(self, k)} must be positive"
            for k in ("lr", "batch_size", "n_concepts")
            if getattr(self, k) <= 0
        ]
        problems += [
            f"{k}={getattr(self, k)} must be >= 0"
            for k in ("lambda_sep", "lambda_con", "lambda_spa", "steps")
            if getattr(self, k) < 0
        ]
        if self.concept_text not in CONCEPT_TEXTS:
            problems.append(f"concept_text={self.concept_text!r} is not one of {CONCEPT_TEXTS}")
        if self.contrastive not in CONTRASTIVE:
            problems.append(f"contrastive={self.contrastive!r} is not one of {CONTRASTIVE}")
        if problems:
            raise ValueError("Bad DealConfig: " + "; ".join(problems) + ".")


def _text_parameters(model: nn.Module) -> list[nn.Parameter]:
    visual = {id(p) for p in model.visual.parameters()}
    return [p for name, p in model.named_parameters() if id(p) not in visual and name != "logit_scale"]


def contrastive_loss(logits: torch.Tensor, inverse: torch.Tensor, per_image: bool) -> torch.Tensor:
    """Symmetric CLIP loss of (B images, T texts) logits; ``inverse[i]``: the text of image i.

    ``per_image`` (the original): T = B, image i pairs with text i and every other text is a negative,
    even a same-class one. Otherwise T = classes in the batch, duplicates share one text: image -> its
    class, class -> the uniform distribution over its images (equal to the original without repeats).
    """
    if per_image:
        target = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    member = (inverse[None, :] == torch.arange(logits.shape[1], device=logits.device)[:, None]).float()
    to_images = -(member / member.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (F.cross_entropy(logits, inverse) + to_images)


class DealObjective(nn.Module):
    """The DEAL losses of a batch as a module, so that ``accelerator.prepare`` can wrap it (DDP)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable,
        class_names: Sequence[str],
        descriptors: dict[str, list[str]],
        cfg: DealConfig,
    ) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        k = cfg.n_concepts
        short = [c for c in class_names if len(descriptors[c]) < k]
        if short:
            raise ValueError(f"Classes {short[:5]} have fewer than n_concepts={k} descriptors.")
        texts = [concept_text(c, d, cfg.concept_text) for c in class_names for d in descriptors[c][:k]]
        label_texts = (
            [rich_label(c, descriptors[c][:k]) for c in class_names] if cfg.text_augmentation else list(class_names)
        )
        # tokens: (C, K+1, ctx) for maps (K concepts, then the bare class name) and (C, ctx) for L_ctr
        concepts = tokenizer(texts).view(len(class_names), k, -1)
        self.register_buffer(
            "map_tokens", torch.cat([concepts, tokenizer(list(class_names))[:, None]], 1), persistent=False
        )
        self.register_buffer("label_tokens", tokenizer(label_texts), persistent=False)

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_text):
            return F.normalize(self.model.encode_text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, k = self.cfg, self.cfg.n_concepts
        classes, inverse = labels.unique(return_inverse=True)  # duplicates share one encoded text
        map_text = self._encode_text(self.map_tokens[classes].flatten(0, 1)).view(len(classes), k + 1, -1)
        raw, img = explain_with_features(
            self.model, images, map_text[inverse], cfg.start_layer, create_graph=True, detach_maps=cfg.detach_maps
        )
        maps, img = minmax(raw), F.normalize(img, dim=-1)
        txt = self._encode_text(self.label_tokens[classes])
        per_image = cfg.contrastive == "per_image"
        if per_image:
            txt, inverse = txt[inverse], torch.arange(len(labels), device=labels.device)
        ctr = contrastive_loss(self.model.logit_scale.exp() * img @ txt.T, inverse, per_image)
        sep = separation_loss(maps[:, :k])
        con = consistency_loss(maps[:, :k], maps[:, k])
        spa = sparsity_loss(raw[:, :k])
        total = ctr + cfg.lambda_sep * sep + cfg.lambda_con * con + cfg.lambda_spa * spa
        return {"loss": total, "contrastive": ctr, "separation": sep, "consistency": con, "sparsity": spa}


def train_deal(
    model: nn.Module,
    tokenizer: Callable,
    class_names: Sequence[str],
    descriptors: dict[str, list[str]],
    batches: Batches,
    cfg: DealConfig,
    out_dir: str | Path,
    progress: bool = True,
    accelerator=None,
) -> list[dict]:
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
    opt = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )  # the original's Adam (L2 weight decay)
    run = TrainingRun(out_dir, model, opt, writes=accelerator.is_main_process)
    objective, opt = accelerator.prepare(objective, opt)
    objective.train()
    if cfg.eval_mode:
        model.eval()  # the original's --eval: frozen normalisation statistics (BatchNorm), no dropout
    bar = tqdm(
        range(run.start, cfg.steps),
        initial=run.start,
        total=cfg.steps,
        desc="DEAL",
        disable=not progress or not accelerator.is_main_process,
    )
    with run.checkpoint_on_interrupt():
        for step in bar:
            images, labels = batches(step)
            losses = objective(images.to(accelerator.device), torch.as_tensor(labels, device=accelerator.device))
            opt.zero_grad(set_to_none=True)
            accelerator.backward(losses["loss"])
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            run.log({"step": step, **{k: v.item() for k, v in losses.items()}})
            bar.set_postfix(loss=f"{run.history[-1]['loss']:.3f}", sep=f"{run.history[-1]['separation']:.2f}")
    run.finish(config=asdict(cfg))
    model.eval()
    return run.history


def array_batches(
    images: torch.Tensor | np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    to_tensor: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> Batches:
    """``batches(step)``: a seeded random batch of a fixed training set (uint8 arrays need ``to_tensor``)."""
    if batch_size > len(labels):
        raise ValueError(f"batch_size={batch_size} exceeds the {len(labels)} training images.")

    def batches(step: int) -> tuple[torch.Tensor, np.ndarray]:
        idx = np.sort(np.random.default_rng([seed, step]).choice(len(labels), size=batch_size, replace=False))
        chunk = images[idx]
        return (to_tensor(chunk) if to_tensor else chunk), labels[idx]

    return batches


def deal_clip(
    store,
    key: dict,
    model: nn.Module,
    tokenizer: Callable,
    class_names: Sequence[str],
    descriptors: dict[str, list[str]],
    batches: Batches,
    cfg: DealConfig,
    progress: bool = True,
):
    """A DEAL fine-tuned copy of ``model``: loaded from the store or trained there. Returns (model, history).

    ``key`` must say what the base model and the training images are (e.g. ``ch.key(data=...)``); the
    artifact is keyed by it with the class names, descriptors and ``cfg``.
    """
    from .models import load_weights

    params = {"base": key, "classes": list(class_names), "descriptors": descriptors, "config": asdict(cfg)}
    tuned = copy.deepcopy(model)

    def load(d: Path):
        load_weights(tuned, d / "model.pt")
        return tuned.eval(), json.loads((d / "history.json").read_text())

    return store.get_or_build(
        "deal",
        params,
        lambda d: train_deal(
            copy.deepcopy(model), tokenizer, class_names, descriptors, batches, cfg, d, progress=progress
        ),
        load,
        collective=True,
    )


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: Callable,
    images: torch.Tensor,
    labels: np.ndarray,
    class_names: Sequence[str],
    descriptors,
    n_concepts: int = 5,
    part_masks: np.ndarray | None = None,
    start_layer: int | None = None,
    batch_size: int = 32,
    concept_text: str = "bare",
    localizability: Sequence[str] = ("correct",),
    n_localize: int | None = None,
    zero_shot_prompts: str = "bare",
    references: bool = False,
    progress: bool = False,
) -> tuple[dict[str, float], torch.Tensor, dict[str, np.ndarray]]:
    """DEAL's evaluation of ``model`` on preprocessed ``images``, plus ground truth where ``part_masks`` exist.

    ``descriptors`` is a DescriptorSet; the first ``n_concepts`` of each image's class are explained, as
    :func:`~conceptlab.descriptors.concept_text` ``concept_text`` writes them. ``part_masks`` (N, K, H, W):
    the mask of the part each descriptor is about (empty: no part). ``localizability``: the variants of
    :data:`LOCALIZABILITY` to compute (K x 5 forward passes per image each) on the first ``n_localize``
    images (None: all); "correct" is reported as ``localizability``, the others as
    ``localizability_<variant>``. Zero-shot uses :data:`ZERO_SHOT_PROMPTS` (``"bare"``: the class name, as
    the original); top-5 only where there are more than 5 classes. Classification by description uses
    the sentences "{class}, which has {descriptor}", as the original. Returns (metrics, maps (N, K, h, w),
    per image): ``per_image`` holds each image's ``top1`` hit, ``separation_loss``, ``localizability`` (first
    ``n_localize`` images, "correct" variant if computed) and, with masks, ``pointing_game`` (mean over its
    part descriptors), the units a bootstrap interval resamples.

    ``references``: also each map score's references, through the same conversion as the score. Chance:
    ``chance_disentanglability`` (every map's pixels permuted: the same values placed at random) and
    ``chance_localizability`` (uniform random maps, "correct" variant). With ``part_masks``, the truth
    (the ceiling): ``truth_disentanglability`` and ``truth_localizability`` of the part masks as maps
    (:func:`~conceptlab.metrics.mask_maps`; localizability over concepts with a part). Per image:
    ``chance_separation_loss``, ``chance_localizability``, ``truth_separation_loss``, ``truth_localizability``.
    """
    from .descriptors import description_logits, descriptor_text_features
    from .metrics import (
        disentanglability,
        energy_in_mask,
        insertion_fidelity,
        mask_maps,
        overlap_agreement,
        pointing_game,
        shuffled_pixels,
    )
    from .models import class_text_weights, topk_accuracy

    dev = next(model.parameters()).device
    table = {c: descriptors.descriptors[c][:n_concepts] for c in class_names}
    concept_feats = descriptor_text_features(model, tokenizer, table, class_names, n_concepts, concept_text).to(dev)
    encode = lambda x: F.normalize(model.encode_image(x).float(), dim=-1)  # noqa: E731
    maps, seps, feats = [], [], []
    locs: dict[str, list] = {v: [] for v in localizability}
    gen = torch.Generator().manual_seed(0)
    refs: dict[str, list] = {k: [] for k in ("chance_sep", "chance_loc", "truth_sep", "truth_loc")}
    for s in tqdm(range(0, len(images), batch_size), disable=not progress, desc="evaluate"):
        x, texts = images[s : s + batch_size].to(dev), concept_feats[torch.as_tensor(labels[s : s + batch_size])]
        m = explain(model, x, texts, start_layer)
        seps += [separation_loss(m[i : i + 1]).item() for i in range(len(m))]
        keep = len(x) if n_localize is None else max(0, min(len(x), n_localize - s))
        for variant in locs if keep else ():
            indexing, pairing = LOCALIZABILITY[variant]
            locs[variant].append(
                insertion_fidelity(
                    encode, x[:keep], m[:keep], texts[:keep], original_indexing=indexing, original_pairing=pairing
                ).cpu()
            )
        if references:
            shuffled = shuffled_pixels(m, gen)
            refs["chance_sep"] += [separation_loss(shuffled[i : i + 1]).item() for i in range(len(m))]
            if keep:
                noise = torch.rand(m[:keep].shape, generator=gen).to(dev)
                refs["chance_loc"].append(insertion_fidelity(encode, x[:keep], noise, texts[:keep]).cpu())
        if references and part_masks is not None:
            truth = mask_maps(part_masks[s : s + batch_size], tuple(m.shape[-2:])).to(dev)
            refs["truth_sep"] += [separation_loss(truth[i : i + 1]).item() for i in range(len(m))]
            if keep:
                fidelity = insertion_fidelity(encode, x[:keep], truth[:keep], texts[:keep]).cpu()
                has_part = truth[:keep].flatten(2).sum(-1).cpu() > 0
                refs["truth_loc"].append(torch.where(has_part, fidelity, torch.nan))
        feats.append(encode(x).cpu())
        maps.append(m.cpu())
    maps, feats = torch.cat(maps), torch.cat(feats)
    zero_shot = feats @ class_text_weights(model, tokenizer, class_names, ZERO_SHOT_PROMPTS[zero_shot_prompts]).T
    by_description = description_logits(feats, model, tokenizer, table, class_names)
    hits = (zero_shot.argmax(1) == torch.as_tensor(labels)).float().numpy()
    per_image = {"top1": hits, "separation_loss": np.asarray(seps)}
    out = {
        "disentanglability": disentanglability(seps),
        "separation_loss": float(np.mean(seps)),
        "top1": topk_accuracy(zero_shot, labels, 1),
        "description_top1": topk_accuracy(by_description, labels, 1),
    }
    if len(class_names) > 5:
        out["top5"] = topk_accuracy(zero_shot, labels, 5)
    for variant, values in locs.items():
        if values:
            out["localizability" + ("" if variant == "correct" else f"_{variant}")] = torch.cat(values).mean().item()
            out["n_localize"] = len(torch.cat(values))
    if locs.get("correct"):
        per_image["localizability"] = torch.cat(locs["correct"]).mean(1).numpy()
    for ref in ("chance", "truth"):
        if refs[f"{ref}_sep"]:
            out[f"{ref}_disentanglability"] = disentanglability(refs[f"{ref}_sep"])
            per_image[f"{ref}_separation_loss"] = np.asarray(refs[f"{ref}_sep"])
        if refs[f"{ref}_loc"]:
            fidelity = torch.cat(refs[f"{ref}_loc"])
            out[f"{ref}_localizability"] = fidelity.nanmean().item()
            per_image[f"{ref}_localizability"] = fidelity.nanmean(1).numpy()
    if part_masks is not None:
        overlap = overlap_agreement(maps, part_masks)
        same = overlap["mask_overlap"] > 0
        hit = pointing_game(maps, part_masks).numpy()
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an image whose descriptors name no part
            per_image["pointing_game"] = np.nanmean(hit, 1)
        out.update(
            {
                "pointing_game": float(np.nanmean(hit)),
                "energy_in_mask": float(np.nanmean(energy_in_mask(maps, part_masks).numpy())),
                "map_overlap_same_part": float(overlap["map_overlap"][same].mean()) if same.any() else float("nan"),
                "map_overlap_other_part": float(overlap["map_overlap"][~same].mean()),
            }
        )
    return out, maps, per_image


@torch.no_grad()
def weight_change(tuned: nn.Module, base: nn.Module) -> float:
    """Relative change ``||θ' − θ|| / ||θ||`` of the vision tower's weights."""
    diff = sum(((a - b) ** 2).sum() for a, b in zip(tuned.visual.parameters(), base.visual.parameters()))
    norm = sum((b**2).sum() for b in base.visual.parameters())
    return float((diff / norm).sqrt())
