"""CLIP models: one loader for any open_clip model, and the small CLIP of Concept World.

``load_clip(name, pretrained)`` returns ``(model, preprocess, tokenizer)`` for
- an open_clip architecture with a pretrained tag (``"ViT-B-32", "openai"``),
- an open_clip architecture with a local checkpoint (``"ViT-B-32", "/path/model.pt"``),
- a Hugging Face hub model (``"hf-hub:org/repo"``),
- the registered Concept World architectures (``"ConceptWorld-ViT"``, ``"ConceptWorld-RN"``).

``train_world_clip`` trains the small CLIP contrastively on world captions; it is seeded,
shows progress, checkpoints atomically and resumes where an interrupted run stopped.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .artifacts import ArtifactStore, TrainingRun, safe_torch_load
from .world import ConceptWorld, WorldConfig

open_clip.add_model_config(Path(__file__).parent / "model_configs")
WORLD_ARCHS = ("ConceptWorld-ViT", "ConceptWorld-RN")
CLASS_PROMPTS: tuple[str, ...] = ("a photo of a {}.", "a {}.")


@contextlib.contextmanager
def _quiet_random_init():
    """open_clip logs a warning on the root logger whenever it builds an architecture without
    weights; here that is intended (weights follow from our own checkpoint or training)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_model_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"Unknown open_clip model {name!r}.{hint} "
                         "See open_clip.list_models(), or use 'hf-hub:org/repo'.")


def _looks_like_path(pretrained: str) -> bool:
    return any(c in pretrained for c in "/\\") or pretrained.endswith((".pt", ".pth", ".bin", ".ckpt"))


def load_clip(name: str, pretrained: str | None = None, device: str | None = None):
    """Return ``(model, preprocess, tokenizer)`` in eval mode; see the module docstring."""
    _check_model_name(name)
    dev = pick_device(device)
    if pretrained and _looks_like_path(pretrained):
        with _quiet_random_init():
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        load_weights(model, pretrained)
    else:
        if pretrained and not name.startswith("hf-hub:"):
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pretrained not in tags:
                raise ValueError(f"Model {name!r} has no pretrained tag {pretrained!r}; known tags: {tags}. "
                                 "For your own weights pass a checkpoint path instead.")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        except (OSError, RuntimeError) as err:
            if pretrained is None and not name.startswith("hf-hub:"):
                raise
            raise RuntimeError(f"Could not fetch weights for {name!r} / {pretrained!r} ({err}). Without network "
                               "access, download them elsewhere and pass the local file as `pretrained`.") from err
    return model.to(dev).eval(), preprocess, open_clip.get_tokenizer(name)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a state dict (plain, ``{"state_dict": ...}`` or DDP-prefixed) with a clear mismatch error."""
    state = safe_torch_load(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        raise ValueError(f"Checkpoint {path} does not fit this architecture: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                         f"{len(wrong_shape)} of another shape (e.g. {wrong_shape[:3]}). "
                         "Pass the model name the checkpoint was trained with.")
    model.load_state_dict(state)


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def images_to_tensor(images: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """uint8 (N, H, W, 3) arrays -> normalised float tensor at the model's input size.

    A vectorised stand-in for open_clip's PIL preprocess (resize + normalise), which
    works one PIL image at a time and would dominate training time on the world.
    """
    cfg = model.visual.preprocess_cfg
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    size = image_size(model)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 256,
                  progress: bool = False) -> torch.Tensor:
    """L2-normalised image embeddings; ``images`` are uint8 arrays or preprocessed tensors."""
    dev = next(model.parameters()).device
    out = []
    for s in tqdm(range(0, len(images), batch_size), disable=not progress, desc="encode images"):
        chunk = images[s:s + batch_size]
        x = images_to_tensor(chunk, model) if isinstance(chunk, np.ndarray) else chunk
        out.append(F.normalize(model.encode_image(x.to(dev)).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str],
                 batch_size: int = 512) -> torch.Tensor:
    """L2-normalised text embeddings."""
    dev = next(model.parameters()).device
    out = [F.normalize(model.encode_text(tokenizer(list(texts[s:s + batch_size])).to(dev)).float(), dim=-1).cpu()
           for s in range(0, len(texts), batch_size)]
    return torch.cat(out)


def class_text_weights(model: torch.nn.Module, tokenizer: Callable, class_names: Sequence[str],
                       templates: Sequence[str] = CLASS_PROMPTS) -> torch.Tensor:
    """(C, D) zero-shot classifier: the normalised mean of each class's prompt embeddings."""
    emb = encode_texts(model, tokenizer, [t.format(c) for c in class_names for t in templates])
    return F.normalize(emb.view(len(class_names), len(templates), -1).mean(1), dim=-1)


def topk_accuracy(logits: torch.Tensor, labels: np.ndarray | torch.Tensor, k: int = 1) -> float:
    labels = torch.as_tensor(labels)
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(1).float().mean().item()


# ---------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig:
    """How the world CLIP is trained. Part of the artifact key, with the WorldConfig."""

    arch: str = "ConceptWorld-ViT"
    n_train: int = 20000
    steps: int = 450
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        problems = [f"{k}={getattr(self, k)} must be positive" for k in
                    ("n_train", "steps", "batch_size", "lr", "checkpoint_every") if getattr(self, k) <= 0]
        if self.arch not in WORLD_ARCHS:
            problems.append(f"arch={self.arch!r} is not a world architecture {WORLD_ARCHS}")
        if self.batch_size > self.n_train:
            problems.append(f"batch_size={self.batch_size} exceeds n_train={self.n_train}")
        if problems:
            raise ValueError("Bad TrainConfig: " + "; ".join(problems) + ".")


def _render_training_set(world: ConceptWorld, n: int) -> dict[str, np.ndarray]:
    """Images and the ground truth that captions need; masks are dropped to save memory."""
    keep = {"images": [], "labels": [], "present": [], "attributes": [], "habitats": []}
    for batch in world.stream(n, split="train"):
        for k in keep:
            keep[k].append(getattr(batch, k))
    return {k: np.concatenate(v) for k, v in keep.items()}


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_world_clip(world: ConceptWorld, cfg: TrainConfig, out_dir: str | Path, progress: bool = True,
                     on_step: Callable[[int], None] | None = None) -> list[dict]:
    """Train a world CLIP into ``out_dir`` (``model.pt``, ``history.json``); resumes from ``state.pt``.

    Batches and captions of step ``t`` depend only on ``(cfg.seed, t)``, so a resumed run
    sees exactly the data an uninterrupted one would. ``on_step`` is called after each step.
    """
    torch.manual_seed(cfg.seed)
    with _quiet_random_init():
        model = open_clip.create_model(cfg.arch)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    loss_fn = open_clip.loss.ClipLoss()
    run = TrainingRun(out_dir, model, opt)
    data = _render_training_set(world, cfg.n_train)
    model.train()
    bar = tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps, disable=not progress,
               desc="train CLIP")
    with run.checkpoint_on_interrupt():
        for step in bar:
            rng = np.random.default_rng([cfg.seed, step])
            idx = rng.choice(cfg.n_train, size=cfg.batch_size, replace=False)
            captions, _ = world.resample_captions(data["labels"][idx], data["present"][idx],
                                                  data["attributes"][idx], data["habitats"][idx], [cfg.seed, step])
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            img_f, txt_f, scale = model(images_to_tensor(data["images"][idx], model), open_clip.tokenize(
                captions, context_length=model.context_length))
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            run.history.append({"step": step, "loss": loss.item(), "lr": _lr_at(step, cfg)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if (step + 1) % cfg.checkpoint_every == 0:
                run.checkpoint()
            if on_step:
                on_step(step)
    run.finish()
    return run.history


def world_clip(store: ArtifactStore, world_cfg: WorldConfig, train_cfg: TrainConfig, progress: bool = True):
    """The world CLIP for these parameters: loaded from the store, or trained and stored.

    Returns ``(model, preprocess, tokenizer, history)``.
    """
    params = {"world": asdict(world_cfg), "train": asdict(train_cfg)}
    with store.building("world_clip", params) as d:
        if not (d / "model.pt").exists():
            train_world_clip(ConceptWorld(world_cfg), train_cfg, d, progress=progress)
    model, preprocess, tokenizer = load_clip(train_cfg.arch, str(d / "model.pt"), device="cpu")
    history = json.loads((d / "history.json").read_text())
    return model, preprocess, tokenizer, history


def get_clip(model: str, pretrained: str | None, store: ArtifactStore, world_cfg: WorldConfig,
             train_cfg: TrainConfig, device: str | None = None, progress: bool = True):
    """The chapters' model parameter: ``"world"`` trains/loads the world CLIP, anything else goes to
    :func:`load_clip`. Returns ``(model, preprocess, tokenizer, history or None)``."""
    if model == "world":
        m, preprocess, tokenizer, history = world_clip(store, world_cfg, train_cfg, progress=progress)
        return m.to(pick_device(device)), preprocess, tokenizer, history
    return (*load_clip(model, pretrained, device), None)
