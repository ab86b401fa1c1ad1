"""SAE training throughput on one core: conceptlab's SAE against a plain reference SAE, same data and sizes.

The reference is the textbook version: two ``nn.Linear`` layers, the decoder re-normalised
inside every forward pass (``F.normalize`` on the weight, differentiated through), no
gradient projection and no resampling. ``overcomplete`` is not installed (see
``conceptlab.sae``), so the plain implementation is the baseline.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

from conceptlab.bench import figure, timed
from conceptlab.sae import SAEConfig, train_sae

N, DIM, EXPANSION, BATCH, EPOCHS, L1 = 32768, 128, 8, 4096, 2, 3e-5


def _reference_train(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    enc, dec = nn.Linear(DIM, DIM * EXPANSION), nn.Linear(DIM * EXPANSION, DIM)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=5e-4)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(x)).split(BATCH):
            xb = x[idx]
            z = F.relu(enc(xb - dec.bias))
            x_hat = F.linear(z, F.normalize(dec.weight, dim=0), dec.bias)
            loss = (x_hat - xb).pow(2).mean(-1).mean() + L1 * z.sum(-1).mean()  # the original's scale
            opt.zero_grad()
            loss.backward()
            opt.step()


def run() -> list[dict]:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    x = torch.randn(N, DIM, generator=torch.Generator().manual_seed(0))  # raw, like CLIP embeddings
    cfg = SAEConfig(expansion=EXPANSION, l1=L1, batch_size=BATCH, epochs=EPOCHS, resample_every=1)
    ours = timed(lambda: train_sae(x, cfg, progress=False), repeat=2)
    reference = timed(lambda: _reference_train(x), repeat=2)
    samples = N * EPOCHS
    return [
        figure(
            "sae_train_throughput",
            samples / ours,
            "samples/s",
            baseline=samples / reference,
            baseline_kind="plain reference SAE (nn.Linear, normalise in forward)",
            concepts=DIM * EXPANSION,
            dim=DIM,
            batch=BATCH,
        )
    ]
