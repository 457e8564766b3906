"""How much each layer's attention-output error costs in next-token loss, measured with gradients.

A quantization error ``e`` in a layer's keys or values changes that layer's attention output (after ``o_proj``) by
``dy``; to first order the loss changes by ``g . dy`` where ``g`` is the gradient of the next-token loss with respect
to that output. ``E[(g . dy)^2]`` (an empirical-Fisher metric) therefore puts every layer's error, keys and values
alike, on the one scale that matters, so bits go where the model is sensitive rather than where errors are large.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm


def output_projection(module: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(module, "o_proj", None)


def attention_output_gradients(
    model: Any, seqs: list[torch.Tensor], layers: list[int], progress: bool = False
) -> dict[int, torch.Tensor]:
    """Gradient of the mean next-token NLL w.r.t. each layer's attention output (``o_proj`` output).

    Returns ``{layer: [S, T, hidden]}`` float32 on CPU, one row per sequence in ``seqs``. Parameters are not touched
    (no ``.grad`` is accumulated on weights): each ``o_proj`` output is replaced by a leaf that requires grad.
    """
    wanted = set(layers)
    attn_modules = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx in wanted and output_projection(module) is not None and idx not in attn_modules:
            attn_modules[idx] = module
    missing = wanted - set(attn_modules)
    if missing:
        raise ValueError(f"Could not find an attention o_proj for layers {sorted(missing)}.")
    grads: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    leaves: dict[int, torch.Tensor] = {}

    def make_hook(l: int) -> Any:
        def hook(_mod: torch.nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            leaf = out.detach().requires_grad_(True)
            leaves[l] = leaf
            return leaf

        return hook

    handles = [output_projection(m).register_forward_hook(make_hook(l)) for l, m in attn_modules.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for ids in tqdm(seqs, desc="calibration: sensitivity", disable=not progress, unit="seq"):
            leaves.clear()
            ids = ids.view(1, -1).to(device)
            with torch.enable_grad():
                out = model(input_ids=ids, labels=ids, use_cache=False)
                targets = [leaves[l] for l in layers]
                gs = torch.autograd.grad(out.loss, targets, allow_unused=True)
            for l, g in zip(layers, gs, strict=True):
                grads[l].append((torch.zeros_like(leaves[l]) if g is None else g).detach().float().cpu()[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {l: torch.stack(v) for l, v in grads.items()}


def fisher_error(grad: torch.Tensor, dy: torch.Tensor) -> float:
    """``mean_t (g_t . dy_t)^2`` over all tokens: the loss-relevant size of an output error."""
    return float((grad * dy).sum(-1).pow(2).mean())
