"""DEAL: fine-tune a CLIP so that its concept explanations are disentangled and localized.

Loss of a batch (METHODS.md §1): ``L = L_ctr + λ_sep L_sep + λ_con L_con + λ_spa L_spa``. The maps of
each image's K descriptors and of its bare class name come from :mod:`conceptlab.explain` (batched,
differentiable unless ``detach_maps``). L_sep and L_con use per-map min-max normalised maps and are
averaged over the batch; L_spa is the original's ``SparsityLoss`` (an image's K maps normalised
jointly, summed over the batch). The training loop runs through ``accelerate`` (CPU, one GPU or
several) and through :class:`conceptlab.training.TrainingRun` (resumable; the data of step t depends
only on ``(seed, t)``).

Where the original code departs from its paper, a switch chooses (:data:`SWITCHES`): the defaults
compute the paper's method, and the chapter reports the original code's variant beside it.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .chapter import Param, Switch
from .descriptors import CONCEPT_TEXTS, concept_text, rich_label
from .explain import explain, explain_with_features, minmax
from .metrics import consistency_loss, separation_loss, sparsity_loss
from .training import TrainingRun

Batches = Callable[[int], tuple[torch.Tensor, np.ndarray]]  # step -> (preprocessed images, labels)

# The paper's headline, ViT-B/32 on ImageNet (before -> after DEAL).
PAPER = {"disentanglability": (0.361, 0.397), "localizability": (0.633, 0.673), "top1": (0.632, 0.708)}
# Localizability variants: (original pixel indexing, original image/map pairing).
LOCALIZABILITY = {"correct": (False, False), "original_indexing": (True, False),
                  "original_indexing_pairing": (True, True)}
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
        problems = [f"{k}={getattr(self, k)} must be positive" for k in
                    ("lr", "batch_size", "n_concepts") if getattr(self, k) <= 0]
        problems += [f"{k}={getattr(self, k)} must be >= 0" for k in ("lambda_sep", "lambda_con", "lambda_spa",
                                                                      "steps") if getattr(self, k) < 0]
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

    def __init__(self, model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                 descriptors: dict[str, list[str]], cfg: DealConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        k = cfg.n_concepts
        short = [c for c in class_names if len(descriptors[c]) < k]
        if short:
            raise ValueError(f"Classes {short[:5]} have fewer than n_concepts={k} descriptors.")
        texts = [concept_text(c, d, cfg.concept_text) for c in class_names for d in descriptors[c][:k]]
        label_texts = [rich_label(c, descriptors[c][:k]) for c in class_names] if cfg.text_augmentation \
            else list(class_names)
        # tokens: (C, K+1, ctx) for maps (K concepts, then the bare class name) and (C, ctx) for L_ctr
        concepts = tokenizer(texts).view(len(class_names), k, -1)
        self.register_buffer("map_tokens", torch.cat([concepts, tokenizer(list(class_names))[:, None]], 1),
                             persistent=False)
        self.register_buffer("label_tokens", tokenizer(label_texts), persistent=False)

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_text):
            return F.normalize(self.model.encode_text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, k = self.cfg, self.cfg.n_concepts
        classes, inverse = labels.unique(return_inverse=True)  # duplicates share one encoded text
        map_text = self._encode_text(self.map_tokens[classes].flatten(0, 1)).view(len(classes), k + 1, -1)
        raw, img = explain_with_features(self.model, images, map_text[inverse], cfg.start_layer,
                                         create_graph=True, detach_maps=cfg.detach_maps)
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
        model.eval()  # the original's --eval: frozen normalisation statistics (BatchNorm), no dropout
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
            run.log({"step": step, **{k: v.item() for k, v in losses.items()}})
            bar.set_postfix(loss=f"{run.history[-1]['loss']:.3f}", sep=f"{run.history[-1]['separation']:.2f}")
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

    ``key`` must say what the base model and the training images are (e.g. ``ch.key(data=...)``); the
    artifact is keyed by it with the class names, descriptors and ``cfg``.
    """
    from .models import load_weights

    params = {"base": key, "classes": list(class_names), "descriptors": descriptors, "config": asdict(cfg)}
    tuned = copy.deepcopy(model)

    def load(d: Path):
        load_weights(tuned, d / "model.pt")
        return tuned.eval(), json.loads((d / "history.json").read_text())

    return store.get_or_build("deal", params, lambda d: train_deal(
        copy.deepcopy(model), tokenizer, class_names, descriptors, batches, cfg, d, progress=progress), load,
        collective=True)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Callable, images: torch.Tensor, labels: np.ndarray,
             class_names: Sequence[str], descriptors, n_concepts: int = 5, part_masks: np.ndarray | None = None,
             start_layer: int | None = None, batch_size: int = 32, concept_text: str = "bare",
             localizability: Sequence[str] = ("correct",), n_localize: int | None = None,
             zero_shot_prompts: str = "bare", progress: bool = False) -> tuple[dict[str, float], torch.Tensor]:
    """DEAL's evaluation of ``model`` on preprocessed ``images``, plus ground truth where ``part_masks`` exist.

    ``descriptors`` is a DescriptorSet; the first ``n_concepts`` of each image's class are explained, as
    :func:`~conceptlab.descriptors.concept_text` ``concept_text`` writes them. ``part_masks`` (N, K, H, W):
    the mask of the part each descriptor is about (empty: no part). ``localizability``: the variants of
    :data:`LOCALIZABILITY` to compute (K x 5 forward passes per image each) on the first ``n_localize``
    images (None: all); "correct" is reported as ``localizability``, the others as
    ``localizability_<variant>``. Zero-shot uses :data:`ZERO_SHOT_PROMPTS` (``"bare"``: the class name, as
    the original); top-5 only where there are more than 5 classes. Classification by description uses
    the sentences "{class}, which has {descriptor}", as the original. Returns (metrics, maps (N, K, h, w)).
    """
    from .descriptors import description_logits, descriptor_text_features
    from .metrics import disentanglability, energy_in_mask, overlap_agreement, pointing_game
    from .metrics import localizability as insertion_fidelity
    from .models import class_text_weights, topk_accuracy

    dev = next(model.parameters()).device
    table = {c: descriptors.descriptors[c][:n_concepts] for c in class_names}
    concept_feats = descriptor_text_features(model, tokenizer, table, class_names, n_concepts, concept_text).to(dev)
    encode = lambda x: F.normalize(model.encode_image(x).float(), dim=-1)  # noqa: E731
    maps, seps, feats = [], [], []
    locs = {v: [] for v in localizability}
    for s in tqdm(range(0, len(images), batch_size), disable=not progress, desc="evaluate"):
        x, texts = images[s:s + batch_size].to(dev), concept_feats[torch.as_tensor(labels[s:s + batch_size])]
        m = explain(model, x, texts, start_layer)
        seps += [separation_loss(m[i:i + 1]).item() for i in range(len(m))]
        keep = len(x) if n_localize is None else max(0, min(len(x), n_localize - s))
        for variant in (locs if keep else ()):
            indexing, pairing = LOCALIZABILITY[variant]
            locs[variant].append(insertion_fidelity(encode, x[:keep], m[:keep], texts[:keep],
                                                    original_indexing=indexing, original_pairing=pairing).cpu())
        feats.append(encode(x).cpu())
        maps.append(m.cpu())
    maps, feats = torch.cat(maps), torch.cat(feats)
    zero_shot = feats @ class_text_weights(model, tokenizer, class_names, ZERO_SHOT_PROMPTS[zero_shot_prompts]).T
    by_description = description_logits(feats, model, tokenizer, table, class_names)
    out = {"disentanglability": disentanglability(seps), "separation_loss": float(np.mean(seps)),
           "top1": topk_accuracy(zero_shot, labels, 1), "description_top1": topk_accuracy(by_description, labels, 1)}
    if len(class_names) > 5:
        out["top5"] = topk_accuracy(zero_shot, labels, 5)
    for variant, values in locs.items():
        if values:
            out["localizability" + ("" if variant == "correct" else f"_{variant}")] = torch.cat(values).mean().item()
            out["n_localize"] = len(torch.cat(values))
    if part_masks is not None:
        overlap = overlap_agreement(maps, part_masks)
        same = overlap["mask_overlap"] > 0
        out.update({"pointing_game": float(np.nanmean(pointing_game(maps, part_masks).numpy())),
                    "energy_in_mask": float(np.nanmean(energy_in_mask(maps, part_masks).numpy())),
                    "map_overlap_same_part": float(overlap["map_overlap"][same].mean()) if same.any() else float("nan"),
                    "map_overlap_other_part": float(overlap["map_overlap"][~same].mean())})
    return out, maps


# ---------------------------------------------------------------------------- the chapter
SWITCHES = {
    "concept_text": Switch("not stated", "bare", "text a descriptor's map is computed for: the bare descriptor "
                           "(original code) or '{class}, which has {descriptor}'"),
    "detach_maps": Switch(False, True, "the original code builds maps from detached attention and gradients "
                          "(frozen weights for Grad-CAM): its map losses carry no gradient"),
    "contrastive": Switch("not stated", "per_image", "same-class texts in a batch: negatives (original code) "
                          "or one shared text per class"),
    "zero_shot_prompts": Switch("not stated", "bare", "zero-shot text: the bare class name (original code) "
                                "or a prompt ensemble"),
    "localizability_headline": Switch("correct", "original_indexing_pairing", "the insertion metric in the "
                                      "headline: whole pixels of the right image, or the original notebook's "
                                      "indexing and image/map pairing (all three are reported)"),
    "deal_lr": Switch(5e-7, 5e-7, "learning rate (the original's ImageNet run); the world CLIP needs more, "
                      "see the learning-rate measurement"),
    "deal_batch_size": Switch(256, 256, "batch size (the original's ImageNet run)"),
    "deal_steps": Switch(5000, 5000, "fine-tuning steps (the original's ImageNet run)"),
    "lambda_sep": Switch(0.1, 0.1, "weight of L_sep (the original's ImageNet run; 0.05 is its script default)"),
    "eval_mode": Switch(True, True, "frozen normalisation statistics while training (the ImageNet run's --eval)"),
}


TRAINING_SWITCHES = ("detach_maps", "contrastive", "deal_lr", "deal_batch_size", "deal_steps", "lambda_sep",
                     "eval_mode")


def switches(params: dict[str, Any]) -> dict[str, Switch]:
    """The switches that apply to a run: without fine-tuning (``deal_steps=0``) none of the training ones."""
    return {k: s for k, s in SWITCHES.items() if params["deal_steps"] > 0 or k not in TRAINING_SWITCHES}


def _check_descriptors(value: str, p: dict[str, Any]) -> str | None:
    from .descriptors import check_descriptor_source

    return check_descriptor_source(value, {**p, "dataset": p.get("dataset", "world")})


def _real(p: dict[str, Any]) -> bool:
    return p["dataset"] != "world"


PARAMETERS: dict[str, Param] = {
    "dataset": Param("world", str, choices=("world", "imagefolder", "cub"), help="evaluation data set"),
    "data_root": Param(None, "dir", applies=_real, help="test images of a real data set"),
    "train_root": Param(None, "dir", applies=lambda p: p["dataset"] == "imagefolder",
                        help="training images (ImageFolder); default: data_root"),
    "n_train": Param(2000, int, min=1, help="training images DEAL draws its batches from"),
    "n_test": Param(400, int, min=1),
    "n_localize": Param(48, int, min=0, help="test images for localizability (K x 5 forward passes each)"),
    "descriptors": Param("oracle", str, check=_check_descriptors,
                         help="'oracle' (world), a JSON file, 'hf:<model>' or 'openai:<model>'"),
    "fault_rate": Param(0.0, float, min=0.0, max=1.0, applies=lambda p: p["descriptors"] == "oracle"),
    "llm_base_url": Param(None, str, applies=lambda p: p["descriptors"].startswith("openai:")),
    "llm_api_key_env": Param("OPENAI_API_KEY", str, applies=lambda p: p["descriptors"].startswith("openai:")),
    "n_concepts": Param(5, int, min=1, help="K descriptors per class (the original: 5)"),
    "concept_text": Param("bare", str, choices=CONCEPT_TEXTS),
    "detach_maps": Param(False, bool, help="True: the original code's detached maps (map losses inert)"),
    "contrastive": Param("per_class", str, choices=CONTRASTIVE),
    "zero_shot_prompts": Param("bare", str, choices=tuple(ZERO_SHOT_PROMPTS)),
    "localizability_headline": Param("correct", str, choices=tuple(LOCALIZABILITY)),
    "lambda_sep": Param(0.1, float, min=0.0),
    "lambda_con": Param(0.01, float, min=0.0),
    "lambda_spa": Param(0.0005, float, min=0.0),
    "deal_lr": Param(1e-4, float, min=1e-12),
    "deal_batch_size": Param(16, int, min=1),
    "deal_steps": Param(80, int, min=0, help="fine-tuning steps; 0 evaluates only"),
    "text_augmentation": Param(True, bool, help="rich labels '{class}. It may contain ...' for L_ctr"),
    "freeze_text": Param(False, bool),
    "eval_mode": Param(True, bool),
    "start_layer": Param(None, int, help="ViT relevance from this block; None: the last block only"),
    "deal_checkpoint": Param(None, "file", help="a fine-tuned checkpoint (the original's released format) "
                             "evaluated beside the base model"),
    "compare_lr": Param([5e-7], list, item=float, help="learning rates trained for ablation_steps beside "
                        "deal_lr, to measure what they move; []: skip"),
    "ablation_lambda_sep": Param([0.0, 0.1], list, item=float, help="[]: no ablation"),
    "ablation_lambda_con": Param([0.01], list, item=float),
    "ablation_steps": Param(40, int, min=1),
    "exercise_steps": Param(20, int, min=1, help="fine-tuning steps of each exercise run"),
    "n_show": Param(4, int, min=1, help="classes in the heat-map grids"),
}


@dataclass
class DealData:
    """What the chapter's cells share: training and test images, descriptors, part masks (world only)."""

    train: Any  # conceptlab.data.EvalSet
    test: Any
    descriptors: Any  # conceptlab.descriptors.DescriptorSet, first n_concepts
    part_masks: np.ndarray | None


_DATA: dict[str, DealData] = {}


def load_data(ch, **changes: Any) -> DealData:
    """The chapter's data for its parameters and ``changes`` (kept in memory: exercises reuse it)."""
    from .artifacts import params_key
    from .data import load_eval_set
    from .descriptors import get_descriptors

    p = {**ch.params, **changes}
    key = params_key({"key": ch.key(), **{k: p[k] for k in ("dataset", "n_train", "n_test", "descriptors",
                                                             "fault_rate", "n_concepts", "seed")}})
    if key not in _DATA:
        clip, preprocess, _, _ = ch.clip()
        world = ch.world if p["dataset"] == "world" else None
        train = load_eval_set(clip, preprocess, p["n_train"], p["dataset"], p["train_root"] or p["data_root"],
                              "train", world, p["seed"])
        test = load_eval_set(clip, preprocess, p["n_test"], p["dataset"], p["data_root"], "test", world, p["seed"])
        ds = get_descriptors(p["descriptors"], test.class_names, ch.store, world, n=max(6, p["n_concepts"]),
                             fault_rate=p["fault_rate"], seed=p["seed"], llm_base_url=p["llm_base_url"],
                             llm_api_key_env=p["llm_api_key_env"]).first(p["n_concepts"])
        masks = ds.part_masks(test.class_names, test.labels, test.masks) if world is not None else None
        _DATA[key] = DealData(train, test, ds, masks)
    return _DATA[key]


def config(params: dict[str, Any], **changes: Any) -> DealConfig:
    """The DealConfig of a chapter's parameters (``changes`` use the parameter names)."""
    p = {**params, **changes}
    return DealConfig(lambda_sep=p["lambda_sep"], lambda_con=p["lambda_con"], lambda_spa=p["lambda_spa"],
                      lr=p["deal_lr"], batch_size=p["deal_batch_size"], steps=p["deal_steps"],
                      n_concepts=p["n_concepts"], start_layer=p["start_layer"],
                      text_augmentation=p["text_augmentation"], freeze_text=p["freeze_text"],
                      eval_mode=p["eval_mode"], concept_text=p["concept_text"], detach_maps=p["detach_maps"],
                      contrastive=p["contrastive"], seed=p["seed"])


def fine_tune(ch, data: DealData, progress: bool = True, **changes: Any):
    """DEAL on the chapter's CLIP with the chapter's parameters and ``changes``: (model, history), stored."""
    clip, _, tokenizer, _ = ch.clip()
    p = ch.params
    cfg = config(p, **changes)
    key = ch.key(data={k: p[k] for k in ("dataset", "n_train", "seed")}, train_root=ch.inputs.get("train_root"))
    batches = array_batches(data.train.images, data.train.labels, cfg.batch_size, p["seed"])
    return deal_clip(ch.store, key, clip, tokenizer, data.test.class_names, data.descriptors.descriptors,
                     batches, cfg, progress=progress)


def scores(ch, model: nn.Module, data: DealData, n: int | None = None, localize: Sequence[str] = ("correct",),
           **changes: Any) -> dict[str, float]:
    """:func:`evaluate` of ``model`` on the first ``n`` test images with the chapter's parameters."""
    p = {**ch.params, **changes}
    test, n = data.test, n or len(data.test.labels)
    masks = None if data.part_masks is None else data.part_masks[:n]
    return evaluate(model, ch.clip()[2], test.images[:n], test.labels[:n], test.class_names, data.descriptors,
                    n_concepts=p["n_concepts"], part_masks=masks, start_layer=p["start_layer"],
                    concept_text=p["concept_text"], localizability=localize, n_localize=p["n_localize"],
                    zero_shot_prompts=p["zero_shot_prompts"])[0]


def fidelity_rows(before: dict[str, float], book: dict[str, float], original: dict[str, float],
                  headline: str = "correct") -> dict[str, dict[str, str]]:
    """Rows for :func:`conceptlab.chapter.fidelity_table`: paper, original code and this book, before -> after.

    ``book`` / ``original``: the DEAL runs with the paper's switches and with the original code's (maps
    detached, localizability with the original notebook's indexing and pairing); ``before`` the base CLIP.
    """
    loc = lambda v: "localizability" + ("" if v == "correct" else f"_{v}")  # noqa: E731
    arrow = lambda a, b: f"{a:.3f} → {b:.3f}"  # noqa: E731
    rows = {}
    for metric in ("disentanglability", "localizability", "top1"):
        mine = loc(headline) if metric == "localizability" else metric
        theirs = loc("original_indexing_pairing") if metric == "localizability" else metric
        rows[metric] = {"paper": arrow(*PAPER[metric]) + " (ImageNet, ViT-B/32)",
                        "original code": arrow(before[theirs], original[theirs]) if theirs in original else "—",
                        "this book": arrow(before[mine], book[mine]) if mine in book else "—"}
    return rows


@torch.no_grad()
def weight_change(tuned: nn.Module, base: nn.Module) -> float:
    """Relative change ``||θ' − θ|| / ||θ||`` of the vision tower's weights."""
    diff = sum(((a - b) ** 2).sum() for a, b in zip(tuned.visual.parameters(), base.visual.parameters()))
    norm = sum((b ** 2).sum() for b in base.visual.parameters())
    return float((diff / norm).sqrt())


# ---------------------------------------------------------------------------- exercises
def exercise(ch, **changes: Any) -> dict[str, float]:
    """A "predict, then run" exercise: DEAL for ``exercise_steps`` steps with ``changes`` (parameter names),
    scored on the first 200 test images (localizability on ``n_localize // 2`` of them)."""
    p = {**ch.params, **changes}
    data = load_data(ch, **changes)
    tuned, history = fine_tune(ch, data, progress=False, deal_steps=p["exercise_steps"], **changes)
    out = scores(ch, tuned, data, n=min(200, len(data.test.labels)), **{**changes, "n_localize": p["n_localize"] // 2})
    out["separation_loss_last_step"] = history[-1]["separation"] if history else float("nan")
    out["weight_change"] = weight_change(tuned, ch.clip()[0])
    return out


def checkpoint_model(ch) -> nn.Module:
    """The ``deal_checkpoint`` of the chapter, loaded into the chapter's architecture (any format
    :func:`conceptlab.models.load_clip` reads, the original's released ``model_state_dict`` file included)."""
    from .models import load_clip

    p = ch.params
    name = ch.train_cfg.arch if p["model"] == "world" else p["model"]
    return load_clip(name, p["deal_checkpoint"], str(ch.device))[0]


def example_rows(labels: np.ndarray, n_classes: int) -> list[int]:
    """Indices of the first test image of each of the first ``n_classes`` classes present (grids span classes)."""
    first = {}
    for i, c in enumerate(labels):
        first.setdefault(int(c), i)
    return [first[c] for c in sorted(first)[:n_classes]]


def map_explorer(ch, data: DealData, models: dict[str, nn.Module], interactive: bool | None = None):
    """Pick a test image and one of its class's descriptors; see each model's map of it (static in the book)."""
    import matplotlib.pyplot as plt

    from .descriptors import descriptor_text_features
    from .explore import explorer
    from .plots import heatmap_grid

    p, test, tokenizer = ch.params, data.test, ch.clip()[2]
    k, names = p["n_concepts"], test.class_names
    feats = {m: descriptor_text_features(model, tokenizer, data.descriptors.descriptors, names, k,
                                         p["concept_text"]) for m, model in models.items()}

    def draw(image: int = 0, descriptor: int = 1) -> plt.Figure:
        c = int(test.labels[image])
        maps = [explain(model, test.images[image:image + 1], feats[m][c, descriptor - 1:descriptor], p["start_layer"])
                for m, model in models.items()]
        fig = heatmap_grid(test.display[image:image + 1], torch.cat(maps, 1).numpy(), [names[c]], list(models))
        fig.suptitle(f"'{data.descriptors.descriptors[names[c]][descriptor - 1]}'", y=1.05, fontsize=9)
        return fig

    return explorer(draw, interactive, image=(0, len(test.labels) - 1), descriptor=(1, k))


RUN_KEYS = {"CLIP": "clip", "DEAL, maps trained (paper)": "deal_maps_trained",
            "DEAL, maps detached (original code)": "deal_maps_detached", "DEAL checkpoint": "deal_checkpoint"}
LOSSES = ("contrastive", "separation", "consistency", "sparsity")


def plot_losses(history: Sequence[dict], title: str):
    """The four DEAL losses of a training run, side by side."""
    import matplotlib.pyplot as plt

    from .plots import curve

    fig, axes = plt.subplots(1, len(LOSSES), figsize=(3.4 * len(LOSSES), 2.6))
    for ax, name in zip(axes, LOSSES):
        curve(history, name, smooth=max(1, len(history) // 10), ax=ax)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def concept_features(ch, model: nn.Module, data: DealData, rows: Sequence[int]) -> torch.Tensor:
    """(len(rows), K, D) text features of the descriptors of each chosen test image's class."""
    from .descriptors import descriptor_text_features

    p = ch.params
    feats = descriptor_text_features(model, ch.clip()[2], data.descriptors.descriptors, data.test.class_names,
                                     p["n_concepts"], p["concept_text"])
    return feats[torch.as_tensor(data.test.labels[list(rows)])]


def chapter_results(ch, evals: dict[str, dict[str, dict[str, float]]], lr_table, ablation: list[dict]) -> dict:
    """The chapter's results: headline, map scores per model and concept text, localizability three ways,
    the learning-rate measurement and the ablation."""
    p = ch.params
    key = {name: RUN_KEYS.get(name, name) for name in evals}
    text_metrics = ("disentanglability", "pointing_game", "energy_in_mask")
    maps = {key[n]: {t: {m: v for m, v in s.items() if m in text_metrics} for t, s in e.items()}
            for n, e in evals.items()}
    loc = {key[n]: {v: e[p["concept_text"]].get("localizability" + ("" if v == "correct" else f"_{v}"))
                    for v in LOCALIZABILITY} for n, e in evals.items()}
    tuned = next((n for n in evals if n != "CLIP"), None)
    headline_loc = "localizability" + ("" if p["localizability_headline"] == "correct"
                                       else f"_{p['localizability_headline']}")
    headline = {f"{m}_{who}": evals[n][p["concept_text"]].get(metric)
                for who, n in (("clip", "CLIP"), ("deal", tuned)) if n
                for m, metric in (("disentanglability", "disentanglability"), ("localizability", headline_loc),
                                  ("top1", "top1"), ("pointing_game", "pointing_game"))}
    return {"headline": headline, "maps_by_concept_text": maps, "localizability": loc,
            "scores": {key[n]: e[p["concept_text"]] for n, e in evals.items()},
            "learning_rate": {str(lr): row for lr, row in lr_table.to_dict(orient="index").items()},
            "ablation": ablation}


def summary(ch, evals: dict[str, dict[str, dict[str, float]]], lr_table) -> list[str]:
    """The chapter's closing summary, every number from the run."""
    p, text = ch.params, ch.params["concept_text"]
    clip = evals["CLIP"]
    pg = lambda s: f", pointing game {s['pointing_game']:.3f}" if "pointing_game" in s else ""  # noqa: E731
    lines = ["Before fine-tuning, " + "; ".join(
        f"{t} concept text: disentanglability {clip[t]['disentanglability']:.3f}{pg(clip[t])}" for t in clip) + "."]
    for name, e in evals.items():
        if name == "CLIP":
            continue
        a, b = clip[text], e[text]
        moves = [f"{m} {a[m]:.3f} → {b[m]:.3f}" for m in ("disentanglability", "localizability", "top1",
                                                           "pointing_game") if m in a and m in b]
        lines.append(f"{name}: " + ", ".join(moves) + ".")
    loc = {v: clip[text].get("localizability" + ("" if v == "correct" else f"_{v}")) for v in LOCALIZABILITY}
    if all(v is not None for v in loc.values()):
        lines.append("Localizability of the CLIP, three ways: " +
                     ", ".join(f"{v.replace('_', ' ')} {x:.3f}" for v, x in loc.items()) + ".")
    if len(lr_table) > 1:
        lines.append(f"In {p['ablation_steps']} steps the vision weights change by " + ", ".join(
            f"{r['relative weight change']:.2e} at lr {lr:g}" for lr, r in lr_table.iterrows()) + " (relative).")
    return lines
