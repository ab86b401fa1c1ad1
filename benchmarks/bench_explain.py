"""Explanation maps, batched over images x concepts versus the original's per-image loop (CPU, one thread).

Same model, same inputs, best of two runs each: ``conceptlab.explain.explain`` against
``per_image_reference`` (K copies of one image per forward/backward pass, as the original computes DEAL's
maps). Goal: >= 10x. For ResNets the ratio is bounded by K: the original's cost is K forward passes to
layer4 per image, ours one (only the attention-pool head runs per concept).
"""

import os

import open_clip
import torch

import conceptlab.models  # noqa: F401  (registers the Concept World architectures)
from conceptlab.bench import figure, timed
from conceptlab.explain import explain, per_image_reference

CASES = (("ConceptWorld-ViT", 32, 6), ("ViT-B-32", 8, 6), ("RN50", 4, 6))  # model, images, concepts


def run() -> list[dict]:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for name, n_images, n_concepts in CASES:
        torch.manual_seed(0)
        model = open_clip.create_model(name).eval()  # random weights: speed does not depend on them
        size = model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        images = torch.randn(n_images, 3, size, size)
        texts = torch.randn(
            n_images, n_concepts, model.text_projection.shape[1] if name != "RN50" else model.visual.output_dim
        )
        explain(model, images[:1], texts[:1])  # warm up
        batched = timed(lambda m=model, x=images, t=texts: explain(m, x, t, normalize=False), repeat=2)
        loop = timed(lambda m=model, x=images, t=texts: per_image_reference(m, x, t), repeat=2)
        pairs = n_images * n_concepts
        rows.append(
            figure(
                f"explain_maps_{name}",
                pairs / batched,
                "maps/s",
                baseline=pairs / loop,
                baseline_kind="per-image loop (original)",
                images=n_images,
                concepts=n_concepts,
            )
        )
    return rows
