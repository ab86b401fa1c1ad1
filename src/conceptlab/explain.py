"""Explanation maps of text concepts on images, batched over images x concepts, for any open_clip CLIP.

- ViT (``VisionTransformer``): gradient-weighted attention relevance (Chefer et al.), from a
  configurable ``start_layer`` to the last block: ``cam = mean_heads(clamp(dS/dA * A, 0))``,
  ``R <- R + cam @ R`` from the identity, map = ``R[CLS, 1:]`` on the patch grid.
- ModifiedResNet (the RN CLIPs): Grad-CAM at ``layer4``.

The ViT score of a pair is ``s(x, t) = exp(logit_scale) * f_I(x) . f_T(t)`` with both embeddings
L2-normalised (the original's ``logits_per_image``). The Grad-CAM target is the original's raw dot
product ``g_I(x) . t`` of the *unnormalised* image embedding ``g_I`` (``output.backward(target)`` in its
``gradCAM``); texts are L2-normalised here, which scales each map by a constant that min-max
normalisation removes.

Detached maps (``detach_maps=True``): the original code builds the ViT relevance from
``attn_probs.detach()`` and ``grad.detach()`` and computes Grad-CAM with every visual weight frozen, so
its maps are constants for the optimiser and DEAL's map losses never reach the model. This switch
reproduces that: the forward pass stays in the graph (the image embedding remains differentiable for
the contrastive loss) but the maps are built from detached attention, activations and gradients.

Batching. The original explains one image at a time with K+1 copies of it. Here everything that
does not depend on the text runs once per image: the blocks before ``start_layer`` (ViT) or the
whole trunk up to ``layer4`` (ResNet); only the tail after it is repeated per concept, all pairs in
one forward and one backward. Images never interact in an eval-mode CLIP, so the gradient of the
summed scores with respect to a pair's own attention equals that pair's gradient computed alone.
With ``create_graph=True`` the maps stay differentiable in the model parameters (DEAL's losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map over its last two dims: ``(h - min) / (max - min + 1e-8)``."""
    flat = maps.flatten(-2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - lo) / (hi - lo + EPS)).view_as(maps)


def model_kind(model: nn.Module) -> str:
    """``"vit"`` or ``"resnet"``; a clear error for vision towers this module cannot explain."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = model.visual
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, VisionTransformer):
        if not all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks):
            raise NotImplementedError(
                "This ViT uses open_clip's CustomResidualAttentionBlock; explanation maps "
                "support the standard ResidualAttentionBlock (OpenAI/LAION CLIP ViTs)."
            )
        if visual.attn_pool is not None or visual.pool_type != "tok":
            raise NotImplementedError(
                f"ViT pooling {visual.pool_type!r} / attentional pooler: relevance maps need "
                "class-token pooling ('tok')."
            )
        return "vit"
    raise NotImplementedError(
        f"Cannot explain a {type(visual).__name__} vision tower: use an open_clip ViT "
        "(VisionTransformer) or ModifiedResNet (RN50, RN101, ...)."
    )


def grid_shape(model: nn.Module) -> tuple[int, int]:
    """Height and width of the maps this model's explanations have."""
    visual = model.visual
    if model_kind(model) == "vit":
        return tuple(visual.grid_size)
    size = visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return size // 32, size // 32


def _attention_with_probs(
    block: nn.Module, x: torch.Tensor, cls_only: bool = False, repeat: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ResidualAttentionBlock forward that also returns the attention probabilities (B, heads, L, L).

    Hand-written because open_clip calls ``nn.MultiheadAttention(need_weights=False)``, which takes the
    fused scaled-dot-product path and never materialises the probabilities; the relevance method needs
    them as a tensor inside the autograd graph (to take dS/dA and, for DEAL, to differentiate again).
    The arithmetic is nn.MultiheadAttention's (batch-first, no mask: vision tokens).

    ``cls_only``: compute only the class token's output (all a last block contributes to a 'tok'-pooled
    embedding, and the only attention row whose gradient is not zero); probabilities are (B, heads, 1, L).
    ``repeat``: repeat each row's probabilities (and what they act on) that many times, one copy per
    concept, so that one backward pass gives every (image, concept) pair its own gradient.
    """
    attn: nn.MultiheadAttention = block.attn
    b, n, d = x.shape
    heads = attn.num_heads
    h = block.ln_1(x)
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    if cls_only:
        q, x = q[:, :1], x[:, :1]
    q, k, v = (t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax((q * (d // heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
    if torch.is_grad_enabled() and not probs.requires_grad:
        probs.requires_grad_(True)
    if repeat > 1:
        probs, v, x = (t.repeat_interleave(repeat, dim=0) for t in (probs, v, x))
    out = (probs @ v).transpose(1, 2).reshape(x.shape)
    x = x + block.ls_1(attn.out_proj(out))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, probs


def _start(start_layer: int | None, n_blocks: int) -> int:
    if start_layer is None:
        return n_blocks - 1
    start = start_layer + n_blocks if start_layer < 0 else start_layer
    if not 0 <= start < n_blocks:
        raise ValueError(
            f"start_layer={start_layer} is outside this ViT's {n_blocks} blocks "
            f"(use 0..{n_blocks - 1}, a negative index, or None for the last block)."
        )
    return start


def relevance_step(relevance: torch.Tensor, probs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """One attention block of the relevance rule: ``R <- R + mean_heads(clamp(dS/dA * A, min=0)) @ R``.

    ``relevance`` (B, L, L), ``probs`` A and ``grads`` dS/dA (B, heads, rows, L). With ``rows < L``
    (the last block, class token only) the first ``rows`` rows of the updated R are returned.
    """
    cam = (grads * probs).clamp(min=0).mean(dim=1)
    return relevance[:, : cam.shape[1]] + cam @ relevance


def _expand_texts(text_features: torch.Tensor, n_images: int) -> torch.Tensor:
    """(K, D) shared concepts or (N, K, D) per-image concepts -> (N, K, D), L2-normalised."""
    if text_features.dim() == 2:
        text_features = text_features.unsqueeze(0).expand(n_images, -1, -1)
    if text_features.dim() != 3 or text_features.shape[0] != n_images:
        raise ValueError(f"text_features must be (K, D) or (N={n_images}, K, D); got {tuple(text_features.shape)}.")
    return F.normalize(text_features, dim=-1)


def _vit_maps(
    model: nn.Module,
    images: torch.Tensor,
    text_features: torch.Tensor,
    start_layer: int | None,
    create_graph: bool,
    detach_maps: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance maps (N, K, gh, gw) and image embeddings of a ViT CLIP.

    The last block is computed for the class token only: the other tokens' outputs do not reach the
    pooled embedding, so their attention rows get zero gradient and add nothing to ``R[CLS]``.
    """
    visual = model.visual
    blocks = visual.transformer.resblocks
    start = _start(start_layer, len(blocks))
    texts = _expand_texts(text_features, len(images))
    n, k = texts.shape[:2]
    with torch.set_grad_enabled(create_graph):
        h = visual._embeds(images)
        for block in blocks[:start]:
            h = block(h)
    with torch.enable_grad():
        probs = []
        if start < len(blocks) - 1:
            h = h.repeat_interleave(k, dim=0)  # earlier start: full blocks, one row per (image, concept) pair
            for block in blocks[start:-1]:
                h, p = _attention_with_probs(block, h)
                probs.append(p)
        h, p = _attention_with_probs(blocks[-1], h, cls_only=True, repeat=k if start == len(blocks) - 1 else 1)
        probs.append(p)
        pooled, _ = visual._pool(h)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        scores = model.logit_scale.exp() * (F.normalize(pooled, dim=-1) * texts.reshape(n * k, -1)).sum(-1)
        grads = torch.autograd.grad(
            scores.sum(), probs, create_graph=create_graph and not detach_maps, retain_graph=create_graph
        )
    if detach_maps:  # the original's interpret(): relevance from attn_probs.detach() and grad.detach()
        probs, grads = [p.detach() for p in probs], [g.detach() for g in grads]
    tokens = probs[0].shape[-1]
    relevance = torch.eye(tokens, dtype=h.dtype, device=h.device).expand(n * k, tokens, tokens)
    for p, g in zip(probs[:-1], grads[:-1]):
        relevance = relevance_step(relevance, p, g)
    cls_row = relevance_step(relevance, probs[-1], grads[-1])  # (N*K, 1, L)
    gh, gw = visual.grid_size
    return cls_row[:, 0, 1:].reshape(n, k, gh, gw), pooled.view(n, k, -1)[:, 0]


def _attention_pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's AttentionPool2d (ModifiedResNet head) for the pooled query only, in plain tensor ops.

    open_clip calls ``F.multi_head_attention_forward(need_weights=False)``, whose fused CPU attention has
    no double backward; DEAL differentiates Grad-CAM maps (a gradient) again, so the head is redone here.
    """
    n, c = x.shape[:2]
    heads = pool.num_heads
    tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C)
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + pool.positional_embedding.to(x.dtype)
    q = pool.q_proj(tokens[:, :1]).view(n, 1, heads, c // heads).transpose(1, 2)
    k = pool.k_proj(tokens).view(n, -1, heads, c // heads).transpose(1, 2)
    v = pool.v_proj(tokens).view(n, -1, heads, c // heads).transpose(1, 2)
    probs = torch.softmax((q * (c // heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
    return pool.c_proj((probs @ v).transpose(1, 2).reshape(n, c))


def _resnet_maps(
    model: nn.Module, images: torch.Tensor, text_features: torch.Tensor, create_graph: bool, detach_maps: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    visual = model.visual
    texts = _expand_texts(text_features, len(images))
    n, k = texts.shape[:2]
    with torch.set_grad_enabled(create_graph):
        x = visual.stem(images)
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = layer(x)
    with torch.enable_grad():
        if not x.requires_grad:
            x.requires_grad_(True)
        acts = x.repeat_interleave(k, dim=0)  # only the attention pool runs once per (image, concept) pair
        pooled = _attention_pool(visual.attnpool, acts)
        target = (pooled * texts.reshape(n * k, -1)).sum(-1)  # raw dot product, as the original
        (grad,) = torch.autograd.grad(
            target.sum(), acts, create_graph=create_graph and not detach_maps, retain_graph=create_graph
        )
    if detach_maps:  # the original's gradCAM(): visual weights frozen, so activations and gradients are constants
        acts, grad = acts.detach(), grad.detach()
    alpha = grad.mean(dim=(-2, -1), keepdim=True)
    cam = F.relu((alpha * acts).sum(1))
    return cam.reshape(n, k, *cam.shape[-2:]), pooled.view(n, k, -1)[:, 0]


def explain_with_features(
    model: nn.Module,
    images: torch.Tensor,
    text_features: torch.Tensor,
    start_layer: int | None = None,
    create_graph: bool = False,
    detach_maps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw maps (N, K, h, w) and the images' (unnormalised) embeddings (N, D) from the same forward pass.

    ``create_graph``: keep the graph (the embeddings, and unless ``detach_maps`` the maps, are
    differentiable in the model parameters). ``detach_maps``: maps as the original code builds them,
    constants for the optimiser (see the module docstring).
    """
    if model_kind(model) == "vit":
        return _vit_maps(model, images, text_features, start_layer, create_graph, detach_maps)
    return _resnet_maps(model, images, text_features, create_graph, detach_maps)


def explain(
    model: nn.Module,
    images: torch.Tensor,
    text_features: torch.Tensor,
    start_layer: int | None = None,
    create_graph: bool = False,
    normalize: bool = True,
) -> torch.Tensor:
    """Explanation maps (N, K, h, w) of K concepts on N preprocessed images, min-max normalised by default.

    ``text_features``: (K, D) concepts shared by all images or (N, K, D) per image (e.g. each image's
    class descriptors). ``start_layer`` applies to ViTs (None: last block only, as in DEAL).
    """
    maps, _ = explain_with_features(model, images, text_features, start_layer, create_graph)
    if not create_graph:
        maps = maps.detach()
    return minmax(maps) if normalize else maps


def per_image_reference(
    model: nn.Module, images: torch.Tensor, text_features: torch.Tensor, start_layer: int | None = None
) -> torch.Tensor:
    """Raw maps computed the original's way, to check and time :func:`explain` against.

    One image at a time: K copies of it, a full forward with every block's attention probabilities
    (all tokens, every block in the graph), one backward, then the relevance or Grad-CAM of each copy.
    """
    texts = _expand_texts(text_features, len(images))
    kind, out = model_kind(model), []
    for image, concepts in zip(images, texts):
        copies = image.expand(len(concepts), *image.shape)
        with torch.enable_grad():
            if kind == "vit":
                visual = model.visual
                blocks = visual.transformer.resblocks
                start = _start(start_layer, len(blocks))
                h, probs = visual._embeds(copies), []
                for block in blocks:
                    h, p = _attention_with_probs(block, h)
                    probs.append(p)
                emb = visual._pool(h)[0]
                emb = emb @ visual.proj if visual.proj is not None else emb
                score = model.logit_scale.exp() * (F.normalize(emb, dim=-1) * concepts).sum(-1)
                grads = torch.autograd.grad(score.sum(), probs[start:])
                relevance = torch.eye(h.shape[1]).expand(len(concepts), -1, -1)
                for p, g in zip(probs[start:], grads):
                    relevance = relevance_step(relevance, p, g)
                out.append(relevance[:, 0, 1:].reshape(len(concepts), *visual.grid_size))
            else:
                visual = model.visual
                layer4_out: list[torch.Tensor] = []
                handle = visual.layer4.register_forward_hook(lambda m, i, o, store=layer4_out: store.append(o))
                emb = visual(copies)
                handle.remove()
                target = (emb * concepts).sum(-1)
                (grad,) = torch.autograd.grad(target.sum(), layer4_out[0])
                out.append(F.relu((grad.mean((-2, -1), keepdim=True) * layer4_out[0]).sum(1)))
    return torch.stack(out).detach()


def explain_batches(
    model: nn.Module,
    images: torch.Tensor,
    text_features: torch.Tensor,
    batch_size: int = 64,
    start_layer: int | None = None,
    normalize: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """:func:`explain` over a large set in chunks of ``batch_size`` images (no graph kept)."""
    from tqdm.auto import tqdm

    dev = next(model.parameters()).device
    out = []
    for s in tqdm(range(0, len(images), batch_size), disable=not progress, desc="explanation maps"):
        texts = text_features if text_features.dim() == 2 else text_features[s : s + batch_size]
        out.append(
            explain(model, images[s : s + batch_size].to(dev), texts.to(dev), start_layer, normalize=normalize).cpu()
        )
    return torch.cat(out)
