"""Write path in Triton: rotate, centre, standardise, scale, bucketize and pack new tokens into code rows.

Bit-exact with :meth:`spectralkv.quantizer.SpectralQuantizer.encode` given the same rotated coordinates: the
kernel compares with the same fp32 boundaries (``count(boundary < z)``, what ``torch.bucketize`` returns), divides
and takes square roots with IEEE rounding (``div_rn``, ``sqrt_rn``) and rounds the scale to fp16 like the
reference, or, for a ``log8`` scale, counts the same fp32 level boundaries below the mean square
(:mod:`spectralkv.scales`). The rotation itself is an fp32 matrix product whose summation order differs from
``torch.einsum``, so a coordinate within about one ulp of a boundary can land in the neighbouring cell (measured in
``tests/test_kernels.py``: a handful per million coordinates).

Layout: one program per (tile of ``BLOCK_T`` tokens, batch row, KV head). The head's bytes are assembled from the
codes with two one-hot matrix products (each code contributes ``(code << shift) & 255`` to its first byte and
``code >> (8 - shift)`` to the next one; contributions never overlap, so the sums are exact bitwise ORs, and every
partial sum is an integer <= 255, exact in fp16 and fp32).

The PyTorch reference is the quantizer itself (:func:`spectralkv.kernels.ref.encode_ref`). For calibrations with
exact outliers the kernel also writes the coordinates (``WRITE_Z``), from which the host picks the outliers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from spectralkv.quantizer import Outliers, SlotOutliers, SpectralQuantizer
from spectralkv.scales import SCALE_FLOOR

from .layout import TABLE_COLS, SpectralTables, tables_for
from .tracing import register_op, skip_launch

SCALE_NONE, SCALE_COMPUTE, SCALE_GIVEN = 0, 1, 2


@triton.jit
def _encode_kernel(
    x_ptr, sx_b, sx_h, sx_t, sx_d,  # x [B, H, T, D] (any float dtype), or rotated z when not ROTATE
    mean_ptr, enc_ptr,  # [H, D], [H, D, D] float32 contiguous
    nbits_ptr, byte_ptr, shift_ptr,  # [H, D] int32: bit width, absolute byte index, bit shift
    bnd_ptr,  # [9, 256] float32 boundaries
    head_off_ptr, head_bytes_ptr,  # [H] int32
    out_ptr, so_b, so_t,  # packed rows [B, T, row_bytes] uint8 (last stride 1)
    scale_ptr, ss_b, ss_t, ss_h,  # scales [B, T, H] fp16 / uint8: written (SCALE_COMPUTE) or read (SCALE_GIVEN)
    stab_ptr,  # [2, 256] float32 log8 scale tables (mean-square boundaries, +inf padded; levels), read when SCALE_LOG8
    z_ptr, sz_b, sz_h, sz_t,  # [B, H, T, D] float32: the coordinates the codes were made from, when WRITE_Z
    T,
    HEAD_DIM: tl.constexpr,
    ROTATE: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    SCALE_LOG8: tl.constexpr,
    WRITE_Z: tl.constexpr,
    SCALE_MIN: tl.constexpr,
    TABLE_STRIDE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HB: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    tmask = offs_t < T
    dmask = offs_d < HEAD_DIM
    x = tl.load(
        x_ptr + b * sx_b + h * sx_h + offs_t[:, None] * sx_t + offs_d[None, :] * sx_d,
        mask=tmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)
    if ROTATE:
        mu = tl.load(mean_ptr + h * HEAD_DIM + offs_d, mask=dmask, other=0.0)
        x = tl.where(dmask[None, :], x - mu[None, :], 0.0)
        enc = tl.load(
            enc_ptr + h * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :],
            mask=dmask[:, None] & dmask[None, :],
            other=0.0,
        )
        z = tl.dot(x, enc, input_precision="ieee")
    else:
        z = x
    s_ptrs = scale_ptr + b * ss_b + offs_t * ss_t + h * ss_h
    if SCALE_MODE == 1:
        ms = tl.sum(z * z, axis=1) * (1.0 / HEAD_DIM)
        if SCALE_LOG8:  # level = number of boundaries < ms, by binary lifting over the 255 sorted boundaries
            level = tl.zeros([BLOCK_T], dtype=tl.int32)
            for k in tl.static_range(8):
                bnd = tl.load(stab_ptr + level + ((128 >> k) - 1))
                level = tl.where(bnd < ms, level + (128 >> k), level)
            tl.store(s_ptrs, level.to(tl.uint8), mask=tmask)
            z = tl.math.div_rn(z, tl.load(stab_ptr + 256 + level)[:, None])
        else:
            s16 = tl.maximum(tl.sqrt_rn(ms), SCALE_MIN).to(tl.float16)
            tl.store(s_ptrs, s16, mask=tmask)
            z = tl.math.div_rn(z, s16.to(tl.float32)[:, None])
    elif SCALE_MODE == 2:
        if SCALE_LOG8:
            level = tl.load(s_ptrs, mask=tmask, other=0).to(tl.int32)
            s = tl.load(stab_ptr + 256 + level)
        else:
            s = tl.load(s_ptrs, mask=tmask, other=1.0).to(tl.float32)
        z = tl.math.div_rn(z, s[:, None])

    if WRITE_Z:  # for the exact outliers, found on the host from the same coordinates the codes come from
        tl.store(z_ptr + b * sz_b + h * sz_h + offs_t[:, None] * sz_t + offs_d[None, :], z,
                 mask=tmask[:, None] & dmask[None, :])

    # bucketize: code = number of boundaries < z, by binary lifting over the 2**nb - 1 sorted boundaries
    nb = tl.load(nbits_ptr + h * HEAD_DIM + offs_d, mask=dmask, other=0)
    row = nb * TABLE_STRIDE
    code = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
    for k in tl.static_range(8):
        step = (128 >> k) >> (8 - nb)  # [BLOCK_D]; 0 once finer than this coordinate's codebook
        idx = tl.maximum(code + step[None, :] - 1, 0)
        bnd = tl.load(bnd_ptr + row[None, :] + idx)
        code = tl.where((step[None, :] > 0) & (bnd < z), code + step[None, :], code)

    # pack: byte j of the head slice = sum of the low parts of codes starting in j and the high parts spilling into j
    head_off = tl.load(head_off_ptr + h)
    nbytes = tl.load(head_bytes_ptr + h)
    sh = tl.load(shift_ptr + h * HEAD_DIM + offs_d, mask=dmask, other=0)
    j0 = tl.load(byte_ptr + h * HEAD_DIM + offs_d, mask=dmask, other=0) - head_off
    active = nb > 0
    spills = active & (sh + nb > 8)
    lo = ((code << sh[None, :]) & 255).to(tl.float16)
    hi = (code >> (8 - sh[None, :])).to(tl.float16)
    offs_j = tl.arange(0, BLOCK_HB)
    onehot_lo = ((j0[:, None] == offs_j[None, :]) & active[:, None]).to(tl.float16)
    onehot_hi = ((j0[:, None] + 1 == offs_j[None, :]) & spills[:, None]).to(tl.float16)
    packed = tl.dot(lo, onehot_lo) + tl.dot(hi, onehot_hi)  # fp32 accumulation, exact integers <= 255
    tl.store(
        out_ptr + b * so_b + offs_t[:, None] * so_t + head_off + offs_j[None, :],
        packed.to(tl.int32).to(tl.uint8),
        mask=tmask[:, None] & (offs_j[None, :] < nbytes),
    )


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(max(1, n)))


def _encode_launch(
    x: torch.Tensor,
    mean: torch.Tensor,
    encoder: torch.Tensor,
    nbits: torch.Tensor,
    byte_index: torch.Tensor,
    shift: torch.Tensor,
    boundaries: torch.Tensor,
    head_offset: torch.Tensor,
    head_bytes: torch.Tensor,
    row_bytes: int,
    max_head_bytes: int,
    token_scale: bool,
    rotate: bool,
    scales: torch.Tensor | None,
    scale_tables: torch.Tensor | None,
    block_t: int,
    write_z: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Owns shapes, strides and grid (flat tensor arguments so it can be a ``torch.library`` op). Returns the
    packed rows, the computed scales (an empty tensor when none were computed: an op may not return an input) and
    the coordinates ``[B, H, T, D]`` the codes were made from (empty unless ``write_z``). ``scale_tables``: a log8
    scale's ``[2, 256]`` tables (None: fp16 scales)."""
    b, h, t, d = x.shape
    out = torch.empty(b, t, row_bytes, dtype=torch.uint8, device=x.device)
    z = torch.empty(b, h, t, d, dtype=torch.float32, device=x.device) if write_z else torch.empty(
        0, dtype=torch.float32, device=x.device)
    log8 = scale_tables is not None
    sdtype = torch.uint8 if log8 else torch.float16
    if not token_scale:
        mode, s = SCALE_NONE, torch.empty(0, dtype=sdtype, device=x.device)
    elif scales is None:
        mode, s = SCALE_COMPUTE, torch.empty(b, t, h, dtype=sdtype, device=x.device)
    else:
        mode, s = SCALE_GIVEN, scales
    s_out = s if mode == SCALE_COMPUTE else torch.empty(0, dtype=sdtype, device=x.device)
    if b * t == 0 or (row_bytes == 0 and not write_z and mode != SCALE_COMPUTE) or skip_launch(_encode_kernel, x):
        return out, s_out, z
    strides = (s.stride(0), s.stride(1), s.stride(2)) if mode != SCALE_NONE else (0, 0, 0)
    wrap_triton(_encode_kernel)[(triton.cdiv(t, block_t), b, h)](
        x, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        mean, encoder,
        nbits, byte_index, shift, boundaries,
        head_offset, head_bytes,
        out, out.stride(0), out.stride(1),
        s if mode != SCALE_NONE else out, *strides,
        scale_tables if log8 else mean,
        z if write_z else out, *(z.stride()[:3] if write_z else (0, 0, 0)),
        t,
        HEAD_DIM=d,
        ROTATE=rotate,
        SCALE_MODE=mode,
        SCALE_LOG8=log8 and mode != SCALE_NONE,
        WRITE_Z=write_z,
        SCALE_MIN=SCALE_FLOOR,
        TABLE_STRIDE=TABLE_COLS,
        BLOCK_T=block_t,
        BLOCK_D=_pow2(d),
        BLOCK_HB=_pow2(max_head_bytes),
    )
    return out, s_out, z


OP_NAME = "spectralkv::encode_packed"
_encode_op = register_op(OP_NAME, _encode_launch, _encode_kernel)


def encode_launch(
    tables: SpectralTables,
    x: torch.Tensor,
    *,
    rotate: bool = True,
    scales: torch.Tensor | None = None,
    block_t: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the write kernel on ``x`` ``[B, H, T, D]``: returns (packed ``[B, T, row_bytes]``, scales or None).

    ``rotate=False`` takes ``x`` as already rotated standardised coordinates (packing order); ``scales``
    ``[B, T, H]`` as stored (fp16, or uint8 levels of a log8 scale), when given, are used instead of being computed
    (only with ``token_scale``). Both exist so a test can check the bucketize-and-pack stage bit for bit on identical
    inputs.
    """
    b, h, t, d = x.shape
    if (h, d) != (tables.num_heads, tables.head_dim):
        raise ValueError(f"x has {h} heads of dim {d}; the quantizer has {tables.num_heads} of {tables.head_dim}.")
    if scales is not None and not tables.token_scale:
        raise ValueError("scales were given but this quantizer has no per-token scale.")
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t}.")
    packed, s, _ = _encode_op(
        x, tables.mean, tables.encoder, tables.nbits, tables.byte_index, tables.shift, tables.boundaries,
        tables.head_offset, tables.head_bytes, tables.row_bytes, tables.max_head_bytes, tables.token_scale,
        rotate, scales, tables.scale_tables, block_t, False,
    )
    if not tables.token_scale:
        return packed, None
    return packed, (s if scales is None else scales)


def spectral_encode(quantizer: SpectralQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop-in for ``quantizer.encode(x)`` running the Triton kernel."""
    return encode_launch(tables_for(quantizer, x.device), x)


def spectral_encode_with_outliers(quantizer: SpectralQuantizer, x: torch.Tensor, *, block_t: int = 16,
                                  slots: int | None = None, tables: SpectralTables | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor | None, Outliers | SlotOutliers | None]:
    """Drop-in for ``quantizer.encode_with_outliers(x, slots=...)``: the kernel writes the codes and the coordinates
    they were made from, and the exact outliers are picked from those (an elementwise threshold and a cap; in fixed
    slots when ``slots`` is given). ``tables``: the quantizer's, when the caller holds them (a compiled step then
    never looks them up, which would guard on the lookup cache)."""
    tables = tables_for(quantizer, x.device) if tables is None else tables
    if quantizer.outlier_threshold is None:
        packed, scales = encode_launch(tables, x, block_t=block_t)
        return packed, scales, None
    b, h, t, d = x.shape
    if (h, d) != (tables.num_heads, tables.head_dim):
        raise ValueError(f"x has {h} heads of dim {d}; the quantizer has {tables.num_heads} of {tables.head_dim}.")
    packed, s, z = _encode_op(
        x, tables.mean, tables.encoder, tables.nbits, tables.byte_index, tables.shift, tables.boundaries,
        tables.head_offset, tables.head_bytes, tables.row_bytes, tables.max_head_bytes, tables.token_scale,
        True, None, tables.scale_tables, block_t, True,
    )
    found = quantizer.find_outliers(z) if slots is None else quantizer.find_slot_outliers(z, slots)
    return packed, (s if tables.token_scale else None), found
