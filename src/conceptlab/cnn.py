"""Target CNNs for filter explanation: a ResNet-18 trained on Concept World, or any torchvision CNN.

``world_cnn(store, world_cfg, cnn_cfg)`` trains (or loads from the artifact store) a
torchvision ResNet-18 whose stem is adapted to 64x64 images: ``conv1`` is a 3x3 stride-2
convolution and the max-pool is removed, so ``layer1 .. layer4`` see 32, 16, 8 and 4 cells a
side (the ImageNet stem would leave ``layer4`` with 2x2 cells). ``load_torchvision_cnn(arch,
weights)`` builds any torchvision classification architecture and loads a local state dict
with ``weights_only=True``. Both come with the input transform they expect
(:class:`CNNInput`), since world and ImageNet models are normalised differently. The world
CNN trains through ``accelerate``: on a GPU when present, on several with ``accelerate launch``.
"""

from __future__ import annotations

import json
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm.auto import tqdm

from .artifacts import ArtifactStore, safe_torch_load
from .models import load_weights
from .training import TrainingRun, cosine_lr, set_lr
from .world import ConceptWorld, WorldConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WORLD_MEAN = (0.5, 0.5, 0.5)
WORLD_STD = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class CNNInput:
    """How uint8 images become a CNN's input: resize to ``size`` and normalise."""

    size: int
    mean: tuple[float, float, float] = WORLD_MEAN
    std: tuple[float, float, float] = WORLD_STD

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)


@dataclass(frozen=True)
class CNNConfig:
    """How the world target CNN is trained. Part of its artifact key, with the WorldConfig."""

    n_train: int = 8000
    steps: int = 220
    batch_size: int = 48
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [
            f"{k}={getattr(self, k)} must be positive"
            for k in ("n_train", "steps", "batch_size", "lr")
            if getattr(self, k) <= 0
        ]
        if self.batch_size > self.n_train:
            problems.append(f"batch_size={self.batch_size} exceeds n_train={self.n_train}")
        if problems:
            raise ValueError("Bad CNNConfig: " + "; ".join(problems) + ".")


def world_resnet18(n_classes: int) -> torch.nn.Module:
    """torchvision ResNet-18 with a 64x64 stem: 3x3 stride-2 ``conv1``, no max-pool."""
    model = torchvision.models.resnet18(num_classes=n_classes)
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def train_world_cnn(
    world: ConceptWorld, cfg: CNNConfig, out_dir: str | Path, device: str | None = None, progress: bool = True
) -> list[dict]:
    """Train the world ResNet-18 into ``out_dir`` (``model.pt``, ``history.json``); resumes from ``state.pt``.

    Runs through ``accelerate``: on the GPU when one is present (``device="cpu"`` forces the CPU), and
    on several GPUs when started with ``accelerate launch``, each process taking its share of every
    batch; only the main process writes. The batch of step ``t`` depends only on ``(cfg.seed, t)``,
    so a resumed run sees the same data.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device is not None and torch.device(device).type == "cpu")
    torch.manual_seed(cfg.seed)
    model = world_resnet18(len(world.class_names)).to(accelerator.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = TrainingRun(out_dir, model, opt, writes=accelerator.is_main_process)  # resumes onto the device
    ddp_model, ddp_opt = accelerator.prepare(model, opt)
    batch = world.sample(cfg.n_train, split="train")
    images, labels = batch.images, torch.from_numpy(batch.labels)
    to_input = CNNInput(world.config.resolution)
    share = slice(accelerator.process_index, None, accelerator.num_processes)
    ddp_model.train()
    bar = tqdm(
        range(run.start, cfg.steps),
        initial=run.start,
        total=cfg.steps,
        disable=not (progress and accelerator.is_main_process),
        desc="train CNN",
    )
    with run.checkpoint_on_interrupt():
        for step in bar:
            idx = np.random.default_rng([cfg.seed, step]).choice(cfg.n_train, size=cfg.batch_size, replace=False)
            idx = np.sort(idx)[share]
            set_lr(opt, cosine_lr(step, cfg.lr, cfg.steps, warmup=max(1, cfg.steps // 20)))
            logits = ddp_model(to_input(images[idx]).to(accelerator.device))
            loss = F.cross_entropy(logits, labels[idx].to(accelerator.device))
            ddp_opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            ddp_opt.step()
            acc = (logits.argmax(1).cpu() == labels[idx]).float().mean().item()
            run.log({"step": step, "loss": loss.item(), "accuracy": acc, "lr": opt.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
    run.finish()
    accelerator.wait_for_everyone()  # every process returns once the main one has written the model
    return run.history


def world_cnn(
    store: ArtifactStore, world_cfg: WorldConfig, cfg: CNNConfig, device: str | None = None, progress: bool = True
) -> tuple[torch.nn.Module, CNNInput, list[dict]]:
    """The world ResNet-18 for these parameters (trained once, then loaded, on the CPU): ``(model, input, history)``."""

    def load(d: Path) -> tuple[torch.nn.Module, CNNInput, list[dict]]:
        model = world_resnet18(world_cfg.n_classes)
        load_weights(model, d / "model.pt")
        return model.eval(), CNNInput(world_cfg.resolution), json.loads((d / "history.json").read_text())

    key = {"world": world_cfg.to_dict(), "cnn": asdict(cfg), "arch": "world_resnet18"}
    return store.get_or_build(
        "world_cnn",
        key,
        lambda d: train_world_cnn(ConceptWorld(world_cfg), cfg, d, device, progress),
        load,
        collective=True,
    )


def randomised_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` with freshly initialised weights (seeded): the random-features baseline."""
    torch.manual_seed(seed)
    copy = deepcopy(model)
    for module in copy.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return copy.eval()


def load_torchvision_cnn(arch: str, weights: str | Path, input_size: int = 224) -> tuple[torch.nn.Module, CNNInput]:
    """A torchvision classification architecture with weights from a local state dict.

    The number of classes is read from the checkpoint's last weight matrix; inputs use the
    ImageNet normalisation at ``input_size`` pixels.
    """
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise ValueError(
            f"target_model={arch!r} is not a torchvision classification model; "
            f"pick one of torchvision.models.list_models(), e.g. 'resnet18', 'alexnet', 'vgg16'."
        )
    if not weights:
        raise ValueError(
            f"target_model={arch!r} needs target_weights=<local state dict file>: this project never downloads weights."
        )
    state = safe_torch_load(weights)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{weights} holds no state dict.")
    last_weight = [v for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2]
    num_classes = last_weight[-1].shape[0] if last_weight else 1000
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    load_weights(model, weights)
    return model.eval(), imagenet_input(input_size)


def imagenet_input(size: int) -> CNNInput:
    """Inputs of an ImageNet-trained torchvision model at ``size`` pixels."""
    return CNNInput(size, IMAGENET_MEAN, IMAGENET_STD)


def get_cnn(
    target_model: str,
    target_weights: str | None,
    store: ArtifactStore,
    world_cfg: WorldConfig,
    cfg: CNNConfig,
    input_size: int = 224,
    device: str | torch.device | None = None,
    progress: bool = True,
):
    """``"world"`` trains/loads the world ResNet-18; a torchvision name loads ``target_weights``.

    Returns ``(model, input transform, history or None)``.
    """
    if target_model == "world":
        return world_cnn(store, world_cfg, cfg, None if device is None else str(device), progress=progress)
    if target_weights is None:  # the random-features baseline of a torchvision architecture
        return torchvision.models.get_model(target_model, weights=None).eval(), imagenet_input(input_size), None
    return (*load_torchvision_cnn(target_model, target_weights, input_size), None)


@torch.no_grad()
def cnn_accuracy(
    model: torch.nn.Module, to_input: CNNInput, images: np.ndarray, labels: np.ndarray, batch_size: int = 256
) -> float:
    """Top-1 accuracy of a classifier on uint8 images."""
    preds = torch.cat(
        [model(to_input(images[s : s + batch_size])).argmax(1) for s in range(0, len(images), batch_size)]
    )
    return (preds.numpy() == labels).mean().item()
