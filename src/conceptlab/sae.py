"""A sparse autoencoder on CLIP embeddings, as in Discover-then-Name (DN-CBM).

``z = ReLU(W_enc (x - b_dec) + b_enc)``, ``x_hat = W_dec z + b_dec``, decoder columns of unit
norm, dead concepts resampled every few epochs. The loss is the one the original *code*
computes (the ``sparse_autoencoder`` library's ``L2ReconstructionLoss`` plus
``LearnedActivationsL1Loss``): the squared error **averaged over the feature dimensions**, plus
``l1`` times the L1 norm of ``z``, both averaged over the batch, on raw (not L2-normalised)
embeddings. ``reconstruction="sum"`` switches to the paper's ``||x - x_hat||^2``; on
``D``-dimensional inputs it equals the original loss with ``l1`` multiplied by ``D``
(:func:`l1_on_original_scale` converts). As in the original training script the tied bias
``b_dec`` starts at zero (no geometric median is passed to the library's model);
``decoder_bias_init="mean"`` starts it at the features' mean instead, which a short run cannot
otherwise reach (Adam moves it by about ``lr`` per step). Two details
differ and have no switch: the encoder starts as the decoder's transpose (the library draws it
independently), and resampling follows the same recipe (inputs drawn with probability ~ loss²,
encoder rows at a fifth of the mean live norm) on up to 16 384 candidates.

Written here rather than taken from ``overcomplete`` (the maintained SAE toolbox on PyPI):
its SAE has no decoder bias (so no ``x - b_dec`` centring) and no dead-neuron resampling,
and it pulls opencv, timm and scikit-image into the environment. The method is a few
lines of PyTorch; the training loop below is meant to be read in one screen.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .artifacts import ArtifactStore, safe_torch_load
from .training import TrainingRun

RECONSTRUCTIONS = ("mean", "sum")
BIAS_INITS = ("zero", "mean")


@dataclass(frozen=True)
class SAEConfig:
    """SAE hyper-parameters; the defaults are the original's (expansion 8, l1 3e-5, lr 5e-4,
    batch 4096, 200 epochs, resampling every 10, reconstruction averaged over dimensions)."""

    expansion: int = 8
    l1: float = 3e-5
    lr: float = 5e-4
    batch_size: int = 4096
    epochs: int = 200
    resample_every: int = 10  # epochs; 0 switches resampling off
    reconstruction: str = "mean"  # "mean": the original code; "sum": the paper's squared L2 norm
    decoder_bias_init: str = "zero"  # "zero": the original code; "mean": the features' mean
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [
            f"{k}={getattr(self, k)} must be positive"
            for k in ("expansion", "lr", "batch_size", "epochs")
            if getattr(self, k) <= 0
        ]
        problems += [f"{k}={getattr(self, k)} must be >= 0" for k in ("l1", "resample_every") if getattr(self, k) < 0]
        if self.reconstruction not in RECONSTRUCTIONS:
            problems.append(f"reconstruction={self.reconstruction!r} is not one of {RECONSTRUCTIONS}")
        if self.decoder_bias_init not in BIAS_INITS:
            problems.append(f"decoder_bias_init={self.decoder_bias_init!r} is not one of {BIAS_INITS}")
        if problems:
            raise ValueError("Bad SAEConfig: " + "; ".join(problems) + ".")


def l1_on_original_scale(l1: float, reconstruction: str, dim: int) -> float:
    """The coefficient that gives the same minimiser in the original code's loss (reconstruction
    averaged over ``dim`` features): ``l1`` itself for ``"mean"``, ``l1 / dim`` for ``"sum"``."""
    return l1 if reconstruction == "mean" else l1 / dim


class SparseAutoencoder(nn.Module):
    """One hidden ReLU layer of ``n_concepts`` units; ``directions`` are the unit-norm decoder columns.

    The buffer ``fired`` marks the concepts active since the last resampling (saved with the weights,
    so that a resumed training run resamples exactly as an uninterrupted one).
    """

    def __init__(self, dim: int, n_concepts: int) -> None:
        super().__init__()
        w_dec = F.normalize(torch.randn(dim, n_concepts), dim=0)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone())  # tied initialisation, trained untied
        self.b_enc = nn.Parameter(torch.zeros(n_concepts))
        self.b_dec = nn.Parameter(torch.zeros(dim))
        self.register_buffer("fired", torch.zeros(n_concepts, dtype=torch.bool))

    @property
    def n_concepts(self) -> int:
        return self.W_dec.shape[1]

    @property
    def directions(self) -> torch.Tensor:
        """(n_concepts, dim) concept directions in the embedding space."""
        return self.W_dec.detach().T.cpu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Concept strengths: ``z = ReLU(W_enc (x - b_dec) + b_enc)``."""
        return F.relu(F.linear(x - self.b_dec, self.W_enc, self.b_enc))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``x_hat = W_dec z + b_dec``."""
        return F.linear(z, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component along each unit-norm column: the step then only rotates it."""
        if self.W_dec.grad is not None:
            self.W_dec.grad -= (self.W_dec.grad * self.W_dec).sum(0, keepdim=True) * self.W_dec


def sae_loss(
    x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, l1: float, reconstruction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, reconstruction term, L1 term)``, each averaged over the batch.

    Per input: the squared error averaged (``"mean"``, the original code) or summed (``"sum"``)
    over the feature dimensions, plus ``l1 * sum_k |z_k|``.
    """
    squared = (x_hat - x).pow(2)
    rec = squared.mean(-1) if reconstruction == "mean" else squared.sum(-1)
    sparsity = z.abs().sum(-1)
    return (rec + l1 * sparsity).mean(), rec.mean(), sparsity.mean()


@torch.no_grad()
def encode_concepts(
    sae: SparseAutoencoder, features: torch.Tensor, batch_size: int = 8192, device: str | torch.device | None = None
) -> torch.Tensor:
    """(N, n_concepts) concept strengths of embeddings (computed on ``device``, returned on the CPU)."""
    dev = torch.device(device) if device is not None else next(sae.parameters()).device
    sae = sae.to(dev)
    return torch.cat(
        [sae.encode(features[s : s + batch_size].to(dev).float()).cpu() for s in range(0, len(features), batch_size)]
    )


@torch.no_grad()
def resample_dead(
    sae: SparseAutoencoder,
    opt: torch.optim.Adam,
    features: torch.Tensor,
    dead: torch.Tensor,
    generator: torch.Generator,
    n_candidates: int = 16384,
) -> int:
    """Point dead concepts at badly reconstructed inputs (chosen with probability ~ loss^2); returns how many.

    The new decoder column is the centred input's direction, the encoder row the same direction
    scaled to a fifth of the mean live encoder norm, the bias zero, and Adam forgets their history.
    ``generator`` is a CPU generator: the choice is the same on every device.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    dev = features.device
    idx = torch.randperm(len(features), generator=generator)[:n_candidates].to(dev)
    x = features[idx]
    loss = (sae(x)[0] - x).pow(2).sum(-1).cpu()
    pick = torch.multinomial(loss.pow(2) + 1e-12, n_dead, replacement=True, generator=generator).to(dev)
    new_dirs = F.normalize(x[pick] - sae.b_dec, dim=-1)
    alive_norm = sae.W_enc[~dead].norm(dim=1).mean() if (~dead).any() else torch.tensor(1.0, device=dev)
    sae.W_dec[:, dead] = new_dirs.T
    sae.W_enc[dead] = new_dirs * 0.2 * alive_norm
    sae.b_enc[dead] = 0
    for param, rows in ((sae.W_enc, dead), (sae.b_enc, dead)):
        for buf in opt.state.get(param, {}).values():
            if buf.dim() > 0:
                buf[rows] = 0
    for buf in opt.state.get(sae.W_dec, {}).values():
        if buf.dim() > 0:
            buf[:, dead] = 0
    return n_dead


def train_sae(
    features: torch.Tensor,
    cfg: SAEConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    checkpoint_seconds: float | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> tuple[SparseAutoencoder, list[dict]]:
    """Train an SAE on (N, D) embeddings on ``device`` (default: the CPU); returns it on the CPU.

    With ``out_dir`` the run checkpoints (:class:`~conceptlab.training.TrainingRun`, one step per
    epoch) and resumes from ``state.pt``. The shuffling and the resampling of epoch ``e`` depend
    only on ``(cfg.seed, e)``, so a resumed run ends with the same weights as an uninterrupted one.
    """
    dev = torch.device(device or "cpu")
    features = features.float().to(dev)
    torch.manual_seed(cfg.seed)
    sae = SparseAutoencoder(features.shape[1], cfg.expansion * features.shape[1]).to(dev)
    if cfg.decoder_bias_init == "mean":
        with torch.no_grad():
            sae.b_dec.copy_(features.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    with tempfile.TemporaryDirectory() as scratch:
        run = TrainingRun(
            out_dir or scratch, sae, opt, writes=out_dir is not None, checkpoint_seconds=checkpoint_seconds
        )
        variance = (features - features.mean(0)).pow(2).sum(-1).mean().item()
        bar = tqdm(
            range(run.start, cfg.epochs), initial=run.start, total=cfg.epochs, disable=not progress, desc="train SAE"
        )
        with run.checkpoint_on_interrupt():
            for epoch in bar:
                row = _train_epoch(sae, opt, features, cfg, epoch, variance)
                run.log(row)
                bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}")
                if on_epoch:
                    on_epoch(epoch)
        if out_dir is not None:
            run.finish()
    return sae.cpu().eval(), run.history


@torch.no_grad()
def sae_step_gradients(
    sae: SparseAutoencoder, x: torch.Tensor, l1: float, reconstruction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass and the gradient of :func:`sae_loss` with respect to every parameter, written out
    and stored in each parameter's ``.grad``; returns ``(x_hat, z, reconstruction term, L1 term)``.

    With ``e = x_hat - x`` and a batch of ``n``: ``dL/dx_hat = 2 e / (n D)`` (``"mean"``; ``2 e / n``
    for ``"sum"``), ``dL/dz = dL/dx_hat W_dec + l1 / n`` where ``z > 0`` and 0 elsewhere (ReLU and
    ``|z|``), then the two linear maps. The same numbers as autograd on :func:`sae_loss` (tested to
    float rounding), without autograd's elementwise backward passes: a third less time per step here.
    """
    n, dim = x.shape
    z = sae.encode(x)
    x_hat = sae.decode(z)
    error = x_hat - x
    squared = error.square().sum(-1)
    rec = squared.mean() / dim if reconstruction == "mean" else squared.mean()
    grad_x_hat = error * (2.0 / (n * dim if reconstruction == "mean" else n))
    grad_z = torch.addmm(torch.full_like(z, l1 / n), grad_x_hat, sae.W_dec).mul_(z > 0)
    sae.W_dec.grad = grad_x_hat.T @ z
    sae.W_enc.grad = grad_z.T @ (x - sae.b_dec)
    sae.b_enc.grad = grad_z.sum(0)
    sae.b_dec.grad = grad_x_hat.sum(0) - sae.b_enc.grad @ sae.W_enc
    return x_hat, z, rec, z.sum(-1).mean()  # z >= 0: |z| = z


def _train_epoch(
    sae: SparseAutoencoder, opt: torch.optim.Adam, features: torch.Tensor, cfg: SAEConfig, epoch: int, variance: float
) -> dict:
    """One pass over ``features`` in the order of ``(cfg.seed, epoch)``, then resampling if due."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    totals = torch.zeros(4, device=features.device)
    for idx in torch.randperm(len(features), generator=gen).split(cfg.batch_size):
        x = features[idx.to(features.device)]
        _, z, rec, l1 = sae_step_gradients(sae, x, cfg.l1, cfg.reconstruction)
        sae.project_decoder_grad()
        opt.step()
        sae.normalise_decoder()
        with torch.no_grad():  # running sums stay tensors: no synchronising .item() per step
            active = z > 0
            sae.fired |= active.any(0)
            sq = rec * x.shape[1] if cfg.reconstruction == "mean" else rec  # squared error summed over dims
            totals += torch.stack([rec, sq, l1, active.sum(-1).float().mean()]) * len(idx)
    rec, sq, l1, l0 = (totals / len(features)).tolist()
    due = bool(cfg.resample_every) and (epoch + 1) % cfg.resample_every == 0
    row = {
        "epoch": epoch,
        "reconstruction": rec,
        "fvu": sq / variance,
        "l1": l1,
        "l0": l0,
        "dead": int((~sae.fired).sum()) if due else None,
        "resampled": 0,
    }
    if due:
        if epoch + 1 < cfg.epochs:
            row["resampled"] = resample_dead(sae, opt, features, ~sae.fired, gen)
        sae.fired[:] = False
    return row


def tensor_fingerprint(x: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and values: an artifact key by content."""
    x = x.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(x.shape)}{x.dtype}".encode())
    digest.update(x.numpy().tobytes())
    return digest.hexdigest()


def load_or_train_sae(
    store: ArtifactStore,
    features: torch.Tensor,
    cfg: SAEConfig,
    key: dict | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[SparseAutoencoder, list[dict]]:
    """The SAE for these features (keyed by their content and ``key``) and hyper-parameters:
    loaded from the store, or trained on ``device`` and stored."""
    dim = features.shape[1]

    def load(d: Path) -> tuple[SparseAutoencoder, list[dict]]:
        sae = SparseAutoencoder(dim, cfg.expansion * dim)
        sae.load_state_dict(safe_torch_load(d / "model.pt", owner="store"))
        return sae.eval(), json.loads((d / "history.json").read_text())

    full_key = {"features": tensor_fingerprint(features), **(key or {}), "sae": asdict(cfg)}
    return store.get_or_build(
        "dncbm_sae", full_key, lambda d: train_sae(features, cfg, d, progress=progress, device=device), load
    )
