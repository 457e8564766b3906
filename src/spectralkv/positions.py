"""RoPE-aware centring of keys: each key is centred on the pre-RoPE key mean rotated to the key's own position.

Pre-RoPE keys carry a large mean (about half their energy on SmolLM2). After RoPE a key at position ``p`` carries
that mean rotated by ``p`` times each pair's frequency, so a single post-RoPE mean and covariance describe the arcs
the calibration's positions traced, and fit positions beyond them badly (at 4096-4352 tokens, 2-4x the relative key
error of positions inside a 2048-token calibration). Centring key ``k_p`` on ``mu + R_p m`` instead, with ``m`` the
mean of the un-rotated keys ``R_p^T k_p``, removes the rotating part exactly; the basis and codebooks then describe
the residual, whose statistics barely depend on position.

``R_p x = x * cos(p w) + rotate_half(x) * sin(p w)`` (transformers' Llama convention: coordinate ``i`` pairs with
``i + D/2``, frequencies ``w = cat(inv_freq, inv_freq)``). Any scaling of cos/sin by the model cancels: ``m`` is
measured with the same unscaled rotation it is applied with. Encode and decode compute the same centre for a token,
so the cache decodes exactly what it encoded even where a model's rotation differs (dynamic RoPE): only the centring
gets less useful there. The fused decode kernel adds one term per token, ``q . R_p m``, from the token's position
(no per-token metadata: a store keeps each row's first position; the static cache's row r is position sinks + r).
"""

from __future__ import annotations

from typing import Any

import torch

ROPE = "rope"
AUTO = "auto"
POSITION_CENTRINGS = (None, ROPE)  # what a calibration records
REQUESTS = (AUTO, ROPE, None)  # what calibrate() takes ("auto": "rope" where the model's RoPE allows it)


def rotate_half(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension (transformers' Llama convention); with ``block``, on each
    consecutive block of that many entries (several heads' coordinates side by side, as a shared basis sees them)."""
    if block is not None and block != x.shape[-1]:
        return rotate_half(x.unflatten(-1, (x.shape[-1] // block, block))).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def position_features(positions: torch.Tensor, frequencies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos(p w)`` and ``sin(p w)``, ``[*positions.shape, D]`` float32; the angles are formed in float64 so long
    contexts keep their precision."""
    angles = positions.to(torch.float64).unsqueeze(-1) * frequencies.to(positions.device, torch.float64)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``R_p x`` for vectors ``x`` broadcast against the features of :func:`position_features`."""
    return x * cos + rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``R_p^T x``: the pre-RoPE key of a post-RoPE one."""
    return x * cos - rotate_half(x * sin)


def check_frequencies(frequencies: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[D]`` finite non-negative frequencies whose two halves agree (the pairing :func:`rotate_half` assumes)."""
    f = torch.as_tensor(frequencies, dtype=torch.float32).reshape(-1)
    if f.numel() != head_dim or head_dim % 2:
        raise ValueError(f"RoPE frequencies must have head_dim={head_dim} (even) entries, got {f.numel()}.")
    if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise ValueError("RoPE frequencies must be finite and non-negative.")
    if not torch.equal(f[: head_dim // 2], f[head_dim // 2 :]):
        raise ValueError("RoPE frequencies must repeat: coordinate i rotates with i + head_dim/2 (rotate_half).")
    return f


def model_rope_frequencies(model: Any, head_dim: int) -> torch.Tensor:
    """The ``[D]`` frequencies of ``model``'s rotary embedding, checked against the cos/sin the model computes.

    Raises ``ValueError`` (saying what to do) when the model has no rotary embedding spectralkv can read, rotates only
    part of the head, or pairs coordinates differently from :func:`rotate_half`."""
    inner = getattr(model, "model", model)
    rot = getattr(inner, "rotary_emb", None)
    inv = getattr(rot, "inv_freq", None)
    hint = ("Calibrate without --position-centring (position_centring=None) for this model.")
    if not isinstance(inv, torch.Tensor):
        raise ValueError(f"RoPE-aware centring needs the model's rotary embedding (`model.model.rotary_emb.inv_freq`), "
                         f"which {type(model).__name__} does not have. {hint}")
    inv = inv.detach().float().cpu().reshape(-1)
    if 2 * inv.numel() != head_dim:
        raise ValueError(f"The model's rotary embedding rotates {2 * inv.numel()} of {head_dim} head dimensions; "
                         f"RoPE-aware centring supports full-dimension RoPE only. {hint}")
    freqs = check_frequencies(torch.cat([inv, inv]), head_dim)
    pos = torch.arange(0, 4096, 97)
    device = rot.inv_freq.device
    probe = torch.zeros(1, pos.numel(), head_dim, device=device)
    with torch.no_grad():
        cos, sin = rot(probe, pos[None].to(device))
    cos, sin = cos[0].float().cpu(), sin[0].float().cpu()
    c, s = position_features(pos, freqs)
    scale = cos[0].abs().max().clamp_min(1e-6)  # cos(0) = the model's attention scaling (1 unless YaRN-like)
    if not (torch.allclose(cos / scale, c, atol=2e-3) and torch.allclose(sin / scale, s, atol=2e-3)):
        raise ValueError("The model's rotary embedding does not compute cos(p * inv_freq) / sin(p * inv_freq) on "
                         f"rotate_half pairs (it may be interleaved or position-scaled). {hint}")
    return freqs


def resolve_position_centring(model: Any, requested: str | None, head_dim: int
                              ) -> tuple[str | None, torch.Tensor | None]:
    """``(centring, frequencies)`` for a calibration of ``model``: ``"auto"`` is ``"rope"`` when the model's rotary
    embedding is one :func:`model_rope_frequencies` reads, else None; ``"rope"`` raises when it is not."""
    if requested not in REQUESTS:
        raise ValueError(f"`position_centring` must be one of {REQUESTS}, got {requested!r}.")
    if requested is None:
        return None, None
    try:
        return ROPE, model_rope_frequencies(model, head_dim)
    except ValueError:
        if requested == ROPE:
            raise
        return None, None


class PositionMoments:
    """Streaming sums that give, after one pass, the pre-RoPE key mean ``m`` and the mean and covariance of the
    residual ``k_p - R_p m`` exactly (``m`` is unknown until the pass ends, so the cross terms with cos/sin are
    accumulated instead of the residual itself). float64, per KV head, constant memory.

    ``block``: the head_dim of ``frequencies`` when each of the ``num_heads`` rows holds several KV heads side by
    side (``dim`` a multiple of it; a basis shared by those heads needs their joint covariance): every head is
    rotated by its own position, with the same frequencies."""

    def __init__(self, num_heads: int, dim: int, frequencies: torch.Tensor, block: int | None = None) -> None:
        self.block = dim if block is None else int(block)
        if self.block <= 0 or dim % self.block:
            raise ValueError(f"block {block!r} must divide dim {dim}.")
        self.frequencies = check_frequencies(frequencies, self.block).repeat(dim // self.block)
        z = dict(dtype=torch.float64)
        self.count = 0
        self.k = torch.zeros(num_heads, dim, **z)
        self.kk = torch.zeros(num_heads, dim, dim, **z)
        self.kc = torch.zeros(num_heads, dim, dim, **z)  # sum k_p cos_p^T
        self.ks = torch.zeros(num_heads, dim, dim, **z)
        self.c = torch.zeros(dim, **z)
        self.s = torch.zeros(dim, **z)
        self.cc = torch.zeros(dim, dim, **z)
        self.cs = torch.zeros(dim, dim, **z)
        self.ss = torch.zeros(dim, dim, **z)

    def update(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """``x``: ``[H, N, D]`` post-RoPE keys at ``positions`` ``[N]``."""
        x = x.detach().to("cpu", torch.float64)
        angles = positions.detach().cpu().to(torch.float64)[:, None] * self.frequencies.double()
        c, s = angles.cos(), angles.sin()  # [N, D]
        self.count += x.shape[1]
        self.k += x.sum(1)
        self.kk += x.transpose(1, 2) @ x
        self.kc += x.transpose(1, 2) @ c
        self.ks += x.transpose(1, 2) @ s
        self.c += c.sum(0)
        self.s += s.sum(0)
        self.cc += c.T @ c
        self.cs += c.T @ s
        self.ss += s.T @ s

    def position_mean(self) -> torch.Tensor:
        """``m = E[R_p^T k_p]`` ``[H, D]``: the pre-RoPE key mean."""
        n = max(self.count, 1)
        kc = self.kc.diagonal(dim1=-2, dim2=-1)
        ks = self.ks.diagonal(dim1=-2, dim2=-1)
        return (kc - rotate_half(ks, self.block)) / n

    def residual(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(m, mu, C)``: the pre-RoPE mean, and the mean ``[H, D]`` and covariance ``[H, D, D]`` of
        ``k_p - R_p m``."""
        n = max(self.count, 1)
        m = self.position_mean()
        jm = rotate_half(m, self.block)
        mu = (self.k - m * self.c - jm * self.s) / n
        cross = (self.kc * m[:, None, :] + self.ks * jm[:, None, :]) / n  # E[k_i (R_p m)_j]
        rr = (m[:, :, None] * m[:, None, :] * self.cc + m[:, :, None] * jm[:, None, :] * self.cs
              + jm[:, :, None] * m[:, None, :] * self.cs.T + jm[:, :, None] * jm[:, None, :] * self.ss) / n
        second = self.kk / n - cross - cross.transpose(1, 2) + rr
        cov = second - mu[:, :, None] * mu[:, None, :]
        return m, mu, cov

    def raw_mean(self) -> torch.Tensor:
        """The post-RoPE key mean (what centring without positions would use)."""
        return self.k / max(self.count, 1)

    def raw_second_moment_trace(self) -> torch.Tensor:
        return self.kk.diagonal(dim1=-2, dim2=-1).sum(-1) / max(self.count, 1)
