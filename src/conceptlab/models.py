"""CLIP models: one loader for any open_clip model, and the small CLIP of Concept World.

``load_clip(name, pretrained)`` returns ``(model, preprocess, tokenizer)`` for
- an open_clip architecture with a pretrained tag (``"ViT-B-32", "openai"``),
- an open_clip architecture with a local checkpoint (``"ViT-B-32", "/path/model.pt"``),
- a Hugging Face hub model (``"hf-hub:org/repo"``),
- the registered Concept World architectures (``"ConceptWorld-ViT"``, ``"ConceptWorld-RN"``).
Checkpoint files may be OpenAI's TorchScript ``.pt``, open_clip, DEAL or plain state dicts, or
safetensors (:func:`read_checkpoint`); the activation (GELU or QuickGELU) follows the weights
(:func:`clip_variant`), never silently the name alone.

``train_world_clip`` trains the small CLIP contrastively on world captions; it is seeded,
shows progress, checkpoints atomically and resumes where an interrupted run stopped.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .artifacts import ArtifactStore, note, safe_torch_load
from .training import TrainingRun, cosine_lr, set_lr
from .world import ConceptWorld, WorldConfig, type_problems

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
        raise ValueError(
            f"Unknown open_clip model {name!r}.{hint} See open_clip.list_models(), or use 'hf-hub:org/repo'."
        )


def _looks_like_path(pretrained: str) -> bool:
    return any(c in pretrained for c in "/\\") or pretrained.endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors"))


# Keys of OpenAI's TorchScript CLIP that are not weights (open_clip drops them the same way).
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# The checkpoint format of DEAL's training script; DEAL fine-tunes OpenAI's CLIP (`clip.load`).
_DEAL_KEYS = {"epoch", "model_state_dict", "optimizer_state_dict", "loss"}
DEAL_FORM = "DEAL checkpoint"


@dataclass(frozen=True)
class Checkpoint:
    """The weights in a user's checkpoint file, and what the file says about their activation.

    ``quick_gelu`` is ``True``/``False`` when the file shows which MLP activation the weights were
    trained with, ``None`` when nothing in it does; ``evidence`` says what showed it.
    """

    state: dict[str, torch.Tensor]
    form: str
    quick_gelu: bool | None = None
    evidence: str = ""


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (OpenAI's released CLIP ``.pt`` files) is a zip with ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())


def _activation_hint(obj: dict) -> tuple[bool | None, str]:
    """An explicit ``quick_gelu`` entry at the top of a checkpoint or in its model config."""
    for where in (obj, obj.get("model_cfg"), obj.get("config")):
        if isinstance(where, dict) and isinstance(where.get("quick_gelu"), bool):
            return where["quick_gelu"], f"the checkpoint records quick_gelu={where['quick_gelu']}"
    return None, ""


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read the weights of a user's CLIP checkpoint, whatever the wrapping.

    Accepted: OpenAI's original TorchScript ``.pt`` (its tensors are taken, as open_clip's own
    ``load_state_dict`` does; TorchScript code is compiled, never run), ``.safetensors``, and
    ``torch.save`` files read with ``weights_only=True``: a plain state dict, ``{"state_dict": ...}``
    (open_clip's training checkpoints), ``{"model_state_dict": ...}`` (DEAL's released format),
    with or without DDP ``module.`` / ``torch.compile`` ``_orig_mod.`` prefixes.

    The activation is inferred from the file only: a TorchScript archive or OpenAI's extra keys
    (``input_resolution``...) mean OpenAI's weights (all trained with QuickGELU); an explicit
    ``quick_gelu`` entry is followed. DEAL's format is reported in ``form`` (see :func:`load_clip`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint file at {path}: check the path, or pass a pretrained tag "
            "(open_clip.list_pretrained()) instead."
        )
    quick_gelu, evidence = None, ""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj, form = load_file(path), "safetensors file"
    elif _is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch.jit.load is deprecated; open_clip still reads them so
                warnings.simplefilter("ignore", FutureWarning)
                obj = torch.jit.load(path, map_location="cpu").state_dict()
        except RuntimeError as err:
            raise ValueError(
                f"{path} is a TorchScript archive that could not be read ({str(err)[:200]}); "
                "it may be truncated: download OpenAI's file again."
            ) from err
        form, quick_gelu, evidence = "TorchScript archive", True, "it is OpenAI's TorchScript release format"
    else:
        obj, form = safe_torch_load(path, owner="user"), "state dict"
        if isinstance(obj, dict):
            quick_gelu, evidence = _activation_hint(obj)
            for wrapper in ("state_dict", "model_state_dict"):
                if isinstance(obj.get(wrapper), dict):
                    form = DEAL_FORM if _DEAL_KEYS <= set(obj) else f"{{{wrapper!r}: ...}} checkpoint"
                    obj = obj[wrapper]
                    break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path} holds a {type(obj).__name__} that is not a state dict (a dict of tensors, "
            "possibly under 'state_dict' or 'model_state_dict'). Save the weights with "
            "torch.save(model.state_dict(), path) and pass that file."
        )
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    if any(k in state for k in _OPENAI_EXTRA_KEYS):
        state = {k: v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}
        if quick_gelu is None:
            quick_gelu, evidence = True, "it has OpenAI's keys input_resolution/context_length/vocab_size"
    return Checkpoint(state, form, quick_gelu, evidence)


def _uses_quick_gelu(name: str) -> bool:
    cfg = open_clip.get_model_config(name) or {}
    return bool(cfg.get("quick_gelu", False)) or name.endswith("-quickgelu")


def clip_variant(name: str, quick_gelu: bool | None, evidence: str, source: str) -> tuple[str, bool]:
    """The open_clip config to build for weights that need ``quick_gelu``: ``(name, force_quick_gelu)``.

    QuickGELU weights named with a GELU config become the registered ``<name>-quickgelu`` (or the
    same config with QuickGELU forced), with a note; GELU weights named with a QuickGELU config are
    refused, naming the config to use. Unknown (``None``): built as named, with a warning when the
    architecture's weights exist both ways (it has a ``-quickgelu`` twin), so that no mismatch is silent.
    """
    if name.startswith(("hf-hub:", "local-dir:")):
        return name, False  # the hub/folder config carries quick_gelu itself
    has_it = _uses_quick_gelu(name)
    twin = f"{name}-quickgelu"
    if quick_gelu is None:
        if not has_it and twin in open_clip.list_models():
            warnings.warn(
                f"{source}: nothing in it says which activation it was trained with; it is loaded "
                f"as {name} (GELU). OpenAI's CLIP weights, and fine-tunes of them, need QuickGELU: "
                f"for those pass model={twin!r}.",
                UserWarning,
                stacklevel=3,
            )
        base = name.removesuffix("-quickgelu")
        if has_it and base != name and base in open_clip.list_models():
            warnings.warn(
                f"{source}: nothing in it says which activation it was trained with; it is loaded as {name} "
                f"(QuickGELU). Weights trained with GELU (open_clip's own trainings and their fine-tunes) "
                f"need model={base!r}.",
                UserWarning,
                stacklevel=3,
            )
        return name, False
    if quick_gelu == has_it:
        return name, False
    if not quick_gelu:
        base = name.removesuffix("-quickgelu")
        raise ValueError(f"{source}: {evidence}, but {name!r} uses QuickGELU. Pass model={base!r}.")
    if twin in open_clip.list_models():
        note(f"{source}: {evidence}, so the weights need QuickGELU: loading them as {twin!r}, not {name!r}.")
        return twin, False
    note(f"{source}: {evidence}, so the weights need QuickGELU: loading {name!r} with QuickGELU.")
    return name, True


def load_clip(name: str, pretrained: str | None = None, device: str | None = None):
    """Return ``(model, preprocess, tokenizer)`` in eval mode; see the module docstring.

    The MLP activation matches the weights (:func:`clip_variant`): a pretrained tag's recorded
    ``quick_gelu``, what :func:`read_checkpoint` finds in a file, and for a checkpoint in DEAL's
    release format of one of OpenAI's architectures, QuickGELU (DEAL fine-tunes OpenAI's CLIP).
    """
    _check_model_name(name)
    dev = pick_device(device)
    if pretrained and _looks_like_path(pretrained):
        ckpt = read_checkpoint(pretrained)
        quick_gelu, evidence = ckpt.quick_gelu, ckpt.evidence
        if quick_gelu is None and ckpt.form == DEAL_FORM and name in open_clip.list_openai_models():
            quick_gelu, evidence = True, "it is in DEAL's format, a fine-tune of OpenAI's CLIP (`clip.load`)"
        arch, force = clip_variant(name, quick_gelu, evidence, f"checkpoint {pretrained}")
        with _quiet_random_init():
            model, _, preprocess = open_clip.create_model_and_transforms(arch, force_quick_gelu=force)
        fit_weights(
            model,
            ckpt.state,
            f"Checkpoint {pretrained} ({ckpt.form})",
            advice="Pass the open_clip model name the checkpoint was trained with.",
        )
        return model.to(dev).eval(), preprocess, open_clip.get_tokenizer(arch)
    arch, force = name, False
    if pretrained and not name.startswith("hf-hub:"):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ValueError(
                f"Model {name!r} has no pretrained tag {pretrained!r}; known tags: {tags}. "
                "For your own weights pass a checkpoint path instead."
            )
        tag_qg = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
        arch, force = clip_variant(
            name, tag_qg, f"open_clip's tag records quick_gelu={tag_qg}", f"{name} / {pretrained}"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, force_quick_gelu=force
        )
    except (OSError, RuntimeError) as err:
        if pretrained is None and not name.startswith("hf-hub:"):
            raise
        raise RuntimeError(
            f"Could not fetch weights for {name!r} / {pretrained!r} ({err}). Without network "
            "access, download them elsewhere and pass the local file as `pretrained`."
        ) from err
    return model.to(dev).eval(), preprocess, open_clip.get_tokenizer(arch)


def fit_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, advice: str = "") -> None:
    """Load ``state`` into ``model`` strictly, with one error naming what does not fit.

    Non-persistent buffers that some exports carry (a TorchScript ``attn_mask``) are dropped, and a
    scalar/1-element ``logit_scale`` is reshaped, as open_clip's own ``load_checkpoint`` does.
    """
    own = model.state_dict()
    buffers = {k for k, _ in model.named_buffers()}
    state = {k: v for k, v in state.items() if k in own or k not in buffers}
    for k in ("logit_scale", "logit_bias"):
        if k in state and k in own and state[k].numel() == own[k].numel():
            state[k] = state[k].reshape(own[k].shape)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{source} does not fit this architecture: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong_shape)} of another shape (e.g. {wrong_shape[:3]}). {advice}".rstrip()
        )
    model.load_state_dict(state)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a checkpoint file of any form :func:`read_checkpoint` reads into ``model``, strictly."""
    fit_weights(
        model,
        read_checkpoint(path).state,
        f"Checkpoint {path}",
        advice="Pass the architecture the checkpoint was trained with.",
    )


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
def encode_images(
    model: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 64, progress: bool = False
) -> torch.Tensor:
    """L2-normalised image embeddings; ``images`` are uint8 arrays or preprocessed tensors.

    Batches of 64: on this project's 2-core CPU the world CLIPs encode a quarter faster than in batches of 256
    (activations stay in cache), with bitwise the same embeddings (tested)."""
    dev = next(model.parameters()).device
    out = []
    for s in tqdm(range(0, len(images), batch_size), disable=not progress, desc="encode images"):
        chunk = images[s : s + batch_size]
        x = images_to_tensor(chunk, model) if isinstance(chunk, np.ndarray) else chunk
        out.append(F.normalize(model.encode_image(x.to(dev)).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 512
) -> torch.Tensor:
    """L2-normalised text embeddings."""
    dev = next(model.parameters()).device
    out = [
        F.normalize(model.encode_text(tokenizer(list(texts[s : s + batch_size])).to(dev)).float(), dim=-1).cpu()
        for s in range(0, len(texts), batch_size)
    ]
    return torch.cat(out)


def class_text_weights(
    model: torch.nn.Module, tokenizer: Callable, class_names: Sequence[str], templates: Sequence[str] = CLASS_PROMPTS
) -> torch.Tensor:
    """(C, D) zero-shot classifier: the normalised mean of each class's prompt embeddings."""
    emb = encode_texts(model, tokenizer, [t.format(c) for c in class_names for t in templates])
    return average_prompts(emb.view(len(class_names), len(templates), -1))


def average_prompts(embeddings: torch.Tensor) -> torch.Tensor:
    """(classes, prompts, D) normalised prompt embeddings -> (classes, D): each class's normalised mean."""
    return F.normalize(embeddings.mean(1), dim=-1)


def topk_accuracy(logits: torch.Tensor, labels: np.ndarray | torch.Tensor, k: int = 1) -> float:
    labels = torch.as_tensor(labels)
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(1).float().mean().item()


def topk_accuracies(
    logits: torch.Tensor, labels: np.ndarray | torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` for each k below the number of classes (k >= classes means nothing)."""
    return {f"top{k}": topk_accuracy(logits, labels, k) for k in ks if k < logits.shape[1]}


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
    # torch's fused AdamW: the same update in one kernel per step instead of a loop over parameters (the
    # token embedding, 49,408 x 128, is 80 % of them): 13 % faster steps of 64 on 2 CPU cores, equal to
    # the loop's weights up to rounding (not bitwise), deterministic from run to run.
    fused_adamw: bool = True

    def __post_init__(self) -> None:
        problems = type_problems(
            self, ints=("n_train", "steps", "batch_size", "warmup", "seed"), reals=("lr", "weight_decay")
        )
        if not isinstance(self.fused_adamw, bool):
            problems.append(f"fused_adamw={self.fused_adamw!r} must be True or False")
        if self.arch not in WORLD_ARCHS:
            problems.append(f"arch={self.arch!r} is not a world architecture {WORLD_ARCHS}")
        if problems:  # ranges are checked on well-typed values only
            raise ValueError("Bad TrainConfig: " + "; ".join(problems) + ".")
        problems = [
            f"{k}={getattr(self, k)} must be positive"
            for k in ("n_train", "steps", "batch_size", "lr")
            if getattr(self, k) <= 0
        ]
        problems += [
            f"{k}={getattr(self, k)} must be >= 0" for k in ("warmup", "weight_decay", "seed") if getattr(self, k) < 0
        ]
        if self.batch_size > self.n_train:
            problems.append(f"batch_size={self.batch_size} exceeds n_train={self.n_train}")
        if self.warmup > self.steps:
            problems.append(f"warmup={self.warmup} exceeds steps={self.steps}")
        if problems:
            raise ValueError("Bad TrainConfig: " + "; ".join(problems) + ".")


def _render_training_set(world: ConceptWorld, n: int) -> dict[str, np.ndarray]:
    """Images and the ground truth that captions need; masks are dropped to save memory."""
    keep: dict[str, list] = {"images": [], "labels": [], "present": [], "attributes": [], "habitats": []}
    for batch in world.stream(n, split="train"):
        for k in keep:
            keep[k].append(getattr(batch, k))
    return {k: np.concatenate(v) for k, v in keep.items()}


def train_world_clip(
    world: ConceptWorld,
    cfg: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    evaluate_every: int = 0,
) -> list[dict]:
    """Train a world CLIP into ``out_dir`` (``model.pt``, ``history.json``); resumes from ``state.pt``.

    Batches and captions of step ``t`` depend only on ``(cfg.seed, t)``, so a resumed run
    sees exactly the data an uninterrupted one would. ``on_step`` is called after each step.
    Each history record carries ``seconds``: training wall time up to that step (rendering the
    training set included, evaluation excluded), summed over resumed runs. ``evaluate(model)``, if
    given, runs in eval mode after every ``evaluate_every``-th step and the last; its numbers join
    that step's record.
    """
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    with _quiet_random_init():
        model = open_clip.create_model(cfg.arch)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98), fused=cfg.fused_adamw
    )
    loss_fn = open_clip.loss.ClipLoss()
    run = TrainingRun(out_dir, model, opt)
    data = _render_training_set(world, cfg.n_train)
    done = run.history[-1].get("seconds", 0.0) if run.history else 0.0  # seconds of earlier, interrupted runs
    model.train()
    bar = tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps, disable=not progress, desc="train CLIP")
    with run.checkpoint_on_interrupt():
        for step in bar:
            rng = np.random.default_rng([cfg.seed, step])
            torch.manual_seed(int(rng.integers(2**62)))  # any torch randomness of step t also follows (seed, t)
            idx = rng.choice(cfg.n_train, size=cfg.batch_size, replace=False)
            captions, _ = world.resample_captions(
                data["labels"][idx],
                data["present"][idx],
                data["attributes"][idx],
                data["habitats"][idx],
                [cfg.seed, step],
            )
            lr = cosine_lr(step, cfg.lr, cfg.steps, cfg.warmup)
            set_lr(opt, lr)
            img_f, txt_f, scale = model(
                images_to_tensor(data["images"][idx], model),
                open_clip.tokenize(captions, context_length=model.context_length),
            )
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            record = {
                "step": step,
                "loss": loss.item(),
                "lr": lr,
                "seconds": round(done + time.perf_counter() - start, 3),
            }
            if (
                evaluate is not None
                and evaluate_every > 0
                and ((step + 1) % evaluate_every == 0 or step + 1 == cfg.steps)
            ):
                paused = time.perf_counter()
                model.eval()
                record.update(evaluate(model))
                model.train()
                start += time.perf_counter() - paused  # evaluation is not training time
            run.log(record)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if on_step:
                on_step(step)
    run.finish()
    return run.history


def world_clip_artifact(world_cfg: WorldConfig, train_cfg: TrainConfig) -> tuple[str, dict]:
    """The store's ``(kind, key)`` of the world CLIP for these parameters."""
    return "world_clip", {"world": world_cfg.to_dict(), "train": asdict(train_cfg)}


def world_clip(store: ArtifactStore, world_cfg: WorldConfig, train_cfg: TrainConfig, progress: bool = True):
    """The world CLIP for these parameters: loaded from the store, or trained and stored.

    Returns ``(model, preprocess, tokenizer, history)``.
    """

    def load(d: Path):
        model, preprocess, tokenizer = load_clip(train_cfg.arch, str(d / "model.pt"), device="cpu")
        return model, preprocess, tokenizer, json.loads((d / "history.json").read_text())

    return store.get_or_build(
        *world_clip_artifact(world_cfg, train_cfg),
        lambda d: train_world_clip(ConceptWorld(world_cfg), train_cfg, d, progress=progress),
        load,
    )


# ---------------------------------------------------------------------------- zero-shot measures
def zero_shot(
    model: torch.nn.Module,
    tokenizer: Callable,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    templates: Sequence[str] = CLASS_PROMPTS,
) -> tuple[torch.Tensor, dict]:
    """Zero-shot logits of ``images`` against class prompts, and top-k accuracies (k < number of classes)."""
    logits = encode_images(model, images) @ class_text_weights(model, tokenizer, class_names, templates).T
    return logits, topk_accuracies(logits, labels)


def habitat_shortcut(predictions: np.ndarray, batch, world: ConceptWorld) -> dict[str, float]:
    """Accuracy on creatures in their home habitat and elsewhere: the gap measures the shortcut."""
    right = predictions == batch.labels
    home = batch.habitats == world.home_habitats(batch.labels)
    return {"home habitat": float(right[home].mean()), "other habitat": float(right[~home].mean())}
