"""A sparse autoencoder on CLIP embeddings, as in Discover-then-Name (DN-CBM).

``z = ReLU(W_enc (x - b_dec) + b_enc)``, ``x_hat = W_dec z + b_dec``, decoder columns of unit
norm, loss ``||x - x_hat||^2 + l1 * ||z||_1``, dead concepts resampled every few epochs.

Written here rather than taken from ``overcomplete`` (the maintained SAE toolbox on PyPI):
its SAE has no decoder bias (so no ``x - b_dec`` centring) and no dead-neuron resampling,
and it pulls opencv, timm and scikit-image into the environment. The method is a few
lines of PyTorch; the training loop below is meant to be read in one screen.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .artifacts import ArtifactStore, atomic_torch_save, atomic_write_json, safe_torch_load


@dataclass(frozen=True)
class SAEConfig:
    """SAE hyper-parameters (DN-CBM: expansion 8, lr 5e-4, batch 4096, 200 epochs, resample every 10)."""

    expansion: int = 8
    l1: float = 3e-5
    lr: float = 5e-4
    batch_size: int = 4096
    epochs: int = 200
    resample_every: int = 10  # epochs; 0 switches resampling off
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [f"{k}={getattr(self, k)} must be positive" for k in ("expansion", "lr", "batch_size", "epochs")
                    if getattr(self, k) <= 0]
        problems += [f"{k}={getattr(self, k)} must be >= 0" for k in ("l1", "resample_every") if getattr(self, k) < 0]
        if problems:
            raise ValueError("Bad SAEConfig: " + "; ".join(problems) + ".")


class SparseAutoencoder(nn.Module):
    """One hidden ReLU layer of ``n_concepts`` units; ``directions`` are the unit-norm decoder columns."""

    def __init__(self, dim: int, n_concepts: int) -> None:
        super().__init__()
        w_dec = F.normalize(torch.randn(dim, n_concepts), dim=0)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone())  # tied initialisation, trained untied
        self.b_enc = nn.Parameter(torch.zeros(n_concepts))
        self.b_dec = nn.Parameter(torch.zeros(dim))

    @property
    def n_concepts(self) -> int:
        return self.W_dec.shape[1]

    @property
    def directions(self) -> torch.Tensor:
        """(n_concepts, dim) concept directions in the embedding space."""
        return self.W_dec.detach().T

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.linear(x - self.b_dec, self.W_enc, self.b_enc))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
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


@torch.no_grad()
def encode_concepts(sae: SparseAutoencoder, features: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """(N, n_concepts) concept strengths of embeddings."""
    return torch.cat([sae.encode(features[s:s + batch_size]) for s in range(0, len(features), batch_size)])


@torch.no_grad()
def resample_dead(sae: SparseAutoencoder, opt: torch.optim.Adam, features: torch.Tensor, dead: torch.Tensor,
                  generator: torch.Generator, n_candidates: int = 16384) -> int:
    """Point dead concepts at badly reconstructed inputs (chosen with probability ~ loss^2); returns how many.

    The new decoder column is the centred input's direction, the encoder row the same direction
    scaled to a fifth of the mean live encoder norm, the bias zero, and Adam forgets their history.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    idx = torch.randperm(len(features), generator=generator)[:n_candidates]
    x = features[idx]
    loss = (sae(x)[0] - x).pow(2).sum(-1)
    pick = torch.multinomial(loss.pow(2) + 1e-12, n_dead, replacement=True, generator=generator)
    new_dirs = F.normalize(x[pick] - sae.b_dec, dim=-1)
    alive_norm = sae.W_enc[~dead].norm(dim=1).mean() if (~dead).any() else torch.tensor(1.0)
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


def train_sae(features: torch.Tensor, cfg: SAEConfig, out_dir: str | Path | None = None, progress: bool = True,
              checkpoint_every: int = 5, on_epoch: Callable[[int], None] | None = None,
              ) -> tuple[SparseAutoencoder, list[dict]]:
    """Train an SAE on (N, D) embeddings. With ``out_dir`` it checkpoints and resumes from ``state.pt``.

    The shuffling and the resampling of epoch ``e`` depend only on ``(cfg.seed, e)``, so a resumed
    run ends with the same weights as an uninterrupted one.
    """
    features = features.float()
    torch.manual_seed(cfg.seed)
    sae = SparseAutoencoder(features.shape[1], cfg.expansion * features.shape[1])
    with torch.no_grad():
        sae.b_dec.copy_(features.mean(0))  # centring; the original starts from the geometric median
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    history, start = [], 0
    state_path = Path(out_dir) / "state.pt" if out_dir else None
    if state_path and state_path.exists():
        state = safe_torch_load(state_path)
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["optimizer"])
        history, start, fired = state["history"], state["epoch"], state["fired"]
    else:
        fired = torch.zeros(sae.n_concepts, dtype=torch.bool)  # concepts active since the last resampling
    variance = (features - features.mean(0)).pow(2).sum(-1).mean().item()
    bar = tqdm(range(start, cfg.epochs), initial=start, total=cfg.epochs, disable=not progress, desc="train SAE")
    for epoch in bar:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        totals = torch.zeros(3)
        for idx in torch.randperm(len(features), generator=gen).split(cfg.batch_size):
            x = features[idx]
            x_hat, z = sae(x)
            mse, l1 = (x_hat - x).pow(2).sum(-1).mean(), z.sum(-1).mean()  # z >= 0, so sum = L1
            loss = mse + cfg.l1 * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.project_decoder_grad()
            opt.step()
            sae.normalise_decoder()
            with torch.no_grad():  # running sums stay tensors: no synchronising .item() per step
                active = z > 0
                fired |= active.any(0)
                totals += torch.stack([mse, l1, active.sum(-1).float().mean()]) * len(idx)
        mse, l1, l0 = (totals / len(features)).tolist()
        row = {"epoch": epoch, "mse": mse, "fvu": mse / variance, "l1": l1, "l0": l0,
               "dead": int((~fired).sum()) if cfg.resample_every and (epoch + 1) % cfg.resample_every == 0 else None,
               "resampled": 0}
        if cfg.resample_every and (epoch + 1) % cfg.resample_every == 0:
            if epoch + 1 < cfg.epochs:
                row["resampled"] = resample_dead(sae, opt, features, ~fired, gen)
            fired[:] = False
        history.append(row)
        bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{l0:.1f}")
        if state_path and (epoch + 1) % checkpoint_every == 0:
            atomic_torch_save({"sae": sae.state_dict(), "optimizer": opt.state_dict(), "history": history,
                               "epoch": epoch + 1, "fired": fired}, state_path)
        if on_epoch:
            on_epoch(epoch)
    sae.eval()
    return sae, history


def load_or_train_sae(store: ArtifactStore, features: torch.Tensor, features_key: dict, cfg: SAEConfig,
                      progress: bool = True) -> tuple[SparseAutoencoder, list[dict]]:
    """The SAE for these features and hyper-parameters: loaded from the store, or trained and stored."""
    d = store.path("dncbm_sae", {"features": features_key, "sae": asdict(cfg)})
    if not (d / "sae.pt").exists():
        sae, history = train_sae(features, cfg, d, progress=progress)
        atomic_torch_save(sae.state_dict(), d / "sae.pt")
        atomic_write_json(d / "history.json", history)
        (d / "state.pt").unlink(missing_ok=True)
    sae = SparseAutoencoder(features.shape[1], cfg.expansion * features.shape[1])
    sae.load_state_dict(safe_torch_load(d / "sae.pt"))
    return sae.eval(), json.loads((d / "history.json").read_text())
