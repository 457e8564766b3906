"""Fused decode attention straight from packed spectral codes (Triton), split-K ("flash-decoding") in two stages.

The math is in :mod:`spectralkv.kernels.ref` (``decode_attention_ref``, which is also the CPU path). Here:

* Host prologue (one batched product, ``O(B * Hq * D^2)``): ``[q @ Dec_k^T, q . mu_k]``, the query rotated once
  into the key basis plus its dot product with the key mean (a per-head constant for all compressed tokens: it
  cancels inside their softmax and is added back to their log-sum-exp in stage 2). The kernels fold the softmax
  scale and ``log2(e)`` in and work in base 2.
* Stage 1, grid ``(B, Hkv, compressed splits + 1)``: a program owns one KV head of one sequence and serves all
  ``G`` query heads of the GQA group (padded to 16 rows for ``tl.dot``). A compressed split walks its contiguous
  range of tokens in tiles of ``BLOCK_T``: decode key codes per coordinate (byte gather, shift, mask, centroid table
  lookup ``tl.load(table + nbits * 256 + code)``), scores ``q_rot . centroids`` times the token scale, online
  softmax in base 2, and the probability-weighted sum of value centroids (times the value scale) in the rotated
  basis. With exact outliers (constexpr ``K_OUT`` / ``V_OUT``) a tile's outlier entries replace their centroids
  before the dot products: one masked pass per entry slot, up to the tile's largest per-token count, from the
  token-major entries and per-token offsets (one prefix sum of the counts on the host). The last split is the
  full-precision tokens (sinks + recent window + new token, model dtype, original basis), the same online softmax
  over ``[B, Hkv, W, D]`` tensors. Each split writes its unnormalised accumulator, running max and running sum; an
  empty split (past the end, or fully masked) writes max ``-inf`` and sum 0.
* Position-centred keys (constexpr ``K_POS``, RoPE-aware calibrations): each compressed token's score gains
  ``q . R_p m = (q * m) . cos(p w) + (q * rotate_half(m)) . sin(p w)``. The two halves of ``w`` repeat, so the host
  prologue sums the halves of ``q * m`` and ``q * rotate_half(m)`` (``D/2`` wide). Writing ``p = p0 + t`` for a
  tile starting at ``p0``, ``cos(p0 w + t w)`` expands by the angle-addition formulas into the tile's ``cos/sin(p0
  w)`` (``D/2`` values, turned into the query side) and ``cos/sin(t w)`` for ``t < BLOCK_T``, the same for every
  tile and computed once per program: two more ``tl.dot`` per tile and no per-token transcendentals (``p0 w``
  reduced modulo 2 pi in float64, so positions far into a long context keep their precision). Nothing else
  changes: no per-token metadata is read.
* Stage 2, grid ``(B, Hkv)``: merges the compressed splits by log-sum-exp in the rotated basis, un-rotates once
  (``o_rot @ Dec_v + mu_v``), merges the full-precision split by log-sum-exp in the original basis, and writes
  ``[B, Hq, D]`` in the query dtype.

So a decode step is three launches: the query product and the two stages. The launcher is registered as the
``torch.library`` op ``spectralkv::decode_attention_packed`` (``triton_op`` + ``wrap_triton``; under the
interpreter an opaque ``custom_op``, see :mod:`.tracing`), so ``torch.compile`` can trace it.

Lookup mode (constexpr ``UNPACK``): ``"gather"`` reads each coordinate's one or two bytes straight from global memory
(served by L1, since a tile's bytes are contiguous); ``"register"`` loads the head's bytes of a tile once,
coalesced, and spreads them to coordinates with ``tl.gather`` in registers. Centroid mode (constexpr ``LOOKUP``):
``"table"`` looks every coordinate's centroid up in the ``[9, 256]`` table in global memory (one gather per
coordinate, served by L1); ``"select"`` picks 1- and 2-bit coordinates' centroids among their 2 + 4 levels in
registers (``tl.where``) and gathers only for wider ones, which at 2-2.5 bits per coordinate are the minority. Both
give the same values bit for bit; which is faster is a GPU measurement (``scripts/bench_decode.py --lookup``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from spectralkv.quantizer import Outliers, SlotOutliers

from .layout import TABLE_COLS, SpectralTables, tables_for
from .ref import LOG2E, PackedSide, _check
from .tracing import register_op, skip_launch

UNPACK_MODES = ("gather", "register")
LOOKUP_MODES = ("table", "select")


@triton.jit
def _centroids(
    codes_ptr, row_off, tmask,  # row_off [BLOCK_T, 1] int64 offsets of the tile's rows
    nb, bidx, sh,  # [BLOCK_D] int32 per-coordinate bits, absolute byte index, shift
    head_off, head_bytes, table_ptr,  # the head's first byte and byte count in the row
    TABLE_STRIDE: tl.constexpr,
    UNPACK: tl.constexpr,
    LOOKUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HB: tl.constexpr,
):
    """``[BLOCK_T, BLOCK_D]`` centroids (0 for 0-bit or padded coordinates) of one head for a tile of tokens."""
    active = nb > 0
    spills = active & (sh + nb > 8)
    if UNPACK == "register":
        offs_j = tl.arange(0, BLOCK_HB)
        raw = tl.load(codes_ptr + row_off + head_off + offs_j[None, :],
                      mask=tmask[:, None] & (offs_j < head_bytes)[None, :], other=0).to(tl.int32)
        rel = tl.where(active, bidx - head_off, 0)
        rel_hi = tl.where(spills, rel + 1, 0)
        lo = tl.gather(raw, tl.broadcast_to(rel[None, :], (BLOCK_T, BLOCK_D)), axis=1)
        hi = tl.gather(raw, tl.broadcast_to(rel_hi[None, :], (BLOCK_T, BLOCK_D)), axis=1)
        hi = tl.where(spills[None, :], hi, 0)
    else:
        ptrs = codes_ptr + row_off + bidx[None, :]
        lo = tl.load(ptrs, mask=tmask[:, None] & active[None, :], other=0).to(tl.int32)
        hi = tl.load(ptrs + 1, mask=tmask[:, None] & spills[None, :], other=0).to(tl.int32)
    code = ((lo | (hi << 8)) >> sh[None, :]) & ((1 << nb) - 1)[None, :]
    if LOOKUP == "select":
        # 1- and 2-bit coordinates pick among their codebook's 2 + 4 levels in registers; only wider ones gather
        # from the table (masked lanes issue no load). The same table values, so the same result bit for bit.
        t1 = table_ptr + TABLE_STRIDE
        t2 = table_ptr + 2 * TABLE_STRIDE
        odd = (code & 1) != 0
        c1 = tl.where(odd, tl.load(t1 + 1), tl.load(t1))
        c2 = tl.where((code & 2) != 0, tl.where(odd, tl.load(t2 + 3), tl.load(t2 + 2)),
                      tl.where(odd, tl.load(t2 + 1), tl.load(t2)))
        wide = (nb > 2)[None, :]
        cw = tl.load(table_ptr + (nb * TABLE_STRIDE)[None, :] + code, mask=wide & tmask[:, None], other=0.0)
        return tl.where(wide, cw, tl.where((nb == 2)[None, :], c2, tl.where((nb == 1)[None, :], c1, 0.0)))
    return tl.load(table_ptr + (nb * TABLE_STRIDE)[None, :] + code)


@triton.jit
def _with_outliers(
    c, tmask, offs_d,  # [BLOCK_T, BLOCK_D] centroids of one head for a tile, [BLOCK_T] live tokens
    cnt_ptr, cnt_off, st_ptr, st_off,  # per-token outlier counts and first-entry offsets ([BLOCK_T] offsets)
    idx_ptr, val_ptr,  # token-major entries: index head * D + coordinate, fp16 value
    head_base, HEAD_DIM: tl.constexpr,
):
    """Replace the centroids of a tile's exact outlier coordinates (of this head) by their stored values.

    One pass per entry slot up to the tile's largest count; entries of other heads never match a coordinate."""
    cnt = tl.load(cnt_ptr + cnt_off, mask=tmask, other=0).to(tl.int32)
    st = tl.load(st_ptr + st_off, mask=tmask, other=0).to(tl.int64)
    for j in range(0, tl.max(cnt, axis=0)):
        live = tmask & (j < cnt)
        idx = tl.load(idx_ptr + st + j, mask=live, other=0).to(tl.int32) - head_base
        val = tl.load(val_ptr + st + j, mask=live, other=0.0).to(tl.float32)
        idx = tl.where(live & (idx >= 0) & (idx < HEAD_DIM), idx, -1)
        c = tl.where(idx[:, None] == offs_d[None, :], val[:, None], c)
    return c


@triton.jit
def _stage1_kernel(
    qx_ptr,  # [B, Hkv, G, D + 1] float32: [q @ Dec_k^T, q . mu_k] (rotated query and mean term, unscaled)
    q_ptr, sq_b, sq_h, sq_d,  # the query [B, Hq, D] in its own dtype (for the full-precision split)
    kc_ptr, skc_b, skc_t,  # key codes [B, N, row_bytes_k] uint8 (last stride 1)
    ks_ptr, sks_b, sks_t, sks_h,  # key scales [B, N, Hkv] fp16, or uint8 levels of a log8 scale
    vc_ptr, svc_b, svc_t,
    vs_ptr, svs_b, svs_t, svs_h,
    ksl_ptr, vsl_ptr,  # [256] float32 log8 scale levels of keys / values, read when K_SCALE_LOG8 / V_SCALE_LOG8
    ko_cnt_ptr, sko_b, sko_t, ko_st_ptr, skst_b, skst_t, ko_idx_ptr, ko_val_ptr,  # key outliers, read when K_OUT
    vo_cnt_ptr, svo_b, svo_t, vo_st_ptr, svst_b, svst_t, vo_idx_ptr, vo_val_ptr,
    k_nb_ptr, k_bi_ptr, k_sh_ptr, k_hoff_ptr, k_hb_ptr, k_tab_ptr,  # key tables ([Hkv, D] x3, [Hkv] x2, [9, 256])
    v_nb_ptr, v_bi_ptr, v_sh_ptr, v_hoff_ptr, v_hb_ptr, v_tab_ptr,
    cm_ptr, scm_b, scm_t,  # compressed-token mask [B, N] (nonzero = attend), read when HAS_COMP_MASK
    cl_ptr, scl_b,  # compressed-token count per sequence [B] int (rows past it are skipped), read when HAS_LENGTHS
    kf_ptr, skf_b, skf_h, skf_t, skf_d,  # full-precision keys [B, Hkv, W, D] (model dtype)
    vf_ptr, svf_b, svf_h, svf_t, svf_d,
    fm_ptr, sfm_b, sfm_t,  # full-precision mask [B, W], read when HAS_FP_MASK
    acc_ptr, m_ptr, l_ptr,  # [B, Hkv, S, G, D], [B, Hkv, S, G] float32
    qp_ptr,  # [B, Hkv, G, 2, D/2] float32: q * m and q * rotate_half(m), halves summed, read when K_POS
    kp_ptr, skp_b,  # [B, 1] int64 position of each row's first compressed token, read when K_POS
    freq_ptr,  # [D/2] float64 RoPE frequencies (one half), read when K_POS
    N, W, split_len, n_comp_splits, qk_scale,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K_POS: tl.constexpr,
    K_SCALE: tl.constexpr,
    V_SCALE: tl.constexpr,
    K_SCALE_LOG8: tl.constexpr,
    V_SCALE_LOG8: tl.constexpr,
    K_OUT: tl.constexpr,
    V_OUT: tl.constexpr,
    HAS_COMP_MASK: tl.constexpr,
    HAS_FP_MASK: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    UNPACK: tl.constexpr,
    LOOKUP: tl.constexpr,
    TABLE_STRIDE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HB_K: tl.constexpr,
    BLOCK_HB_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.program_id(2)
    n_kv = tl.num_programs(1)
    n_split = tl.num_programs(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < G
    dmask = offs_d < HEAD_DIM
    gd_mask = gmask[:, None] & dmask[None, :]
    bh = b * n_kv + h

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    if s < n_comp_splits:
        # compressed tokens: scores and values from codes, in the rotated basis
        q = tl.load(qx_ptr + (bh * G + offs_g[:, None]) * (HEAD_DIM + 1) + offs_d[None, :], mask=gd_mask, other=0.0)
        q = q * qk_scale
        meta = h * HEAD_DIM + offs_d
        k_nb = tl.load(k_nb_ptr + meta, mask=dmask, other=0)
        k_bi = tl.load(k_bi_ptr + meta, mask=dmask, other=0)
        k_sh = tl.load(k_sh_ptr + meta, mask=dmask, other=0)
        k_hoff = tl.load(k_hoff_ptr + h)
        k_hb = tl.load(k_hb_ptr + h)
        v_nb = tl.load(v_nb_ptr + meta, mask=dmask, other=0)
        v_bi = tl.load(v_bi_ptr + meta, mask=dmask, other=0)
        v_sh = tl.load(v_sh_ptr + meta, mask=dmask, other=0)
        v_hoff = tl.load(v_hoff_ptr + h)
        v_hb = tl.load(v_hb_ptr + h)
        if K_POS:
            half = HEAD_DIM // 2
            offs_f = tl.arange(0, BLOCK_F)
            fmask = offs_f < half
            qp_row = (bh * G + offs_g[:, None]) * 2 * half + offs_f[None, :]
            qp_mask = gmask[:, None] & fmask[None, :]
            q_cos = tl.load(qp_ptr + qp_row, mask=qp_mask, other=0.0) * qk_scale
            q_sin = tl.load(qp_ptr + qp_row + half, mask=qp_mask, other=0.0) * qk_scale
            freq = tl.load(freq_ptr + offs_f, mask=fmask, other=0.0)
            first_pos = tl.load(kp_ptr + b * skp_b)
            # cos/sin of t * w for the token offsets t of a tile: the same for every tile
            rel = tl.arange(0, BLOCK_T).to(tl.float64)[:, None] * freq[None, :]  # [BLOCK_T, BLOCK_F]
            rel = (rel - 6.283185307179586 * tl.floor(rel / 6.283185307179586)).to(tl.float32)
            cos_rel = tl.cos(rel)
            sin_rel = tl.sin(rel)
        start = s * split_len
        end = tl.minimum(start + split_len, N)
        if HAS_LENGTHS:  # a preallocated (static) buffer: only its first rows hold tokens; later tiles are not read
            end = tl.minimum(end, tl.load(cl_ptr + b * scl_b).to(tl.int32))
        for t0 in range(start, end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = offs_t < end
            if HAS_COMP_MASK:
                keep = tl.load(cm_ptr + b * scm_b + offs_t * scm_t, mask=tmask, other=0)
                tmask = tmask & (keep != 0)
            offs_t64 = offs_t.to(tl.int64)
            ck = _centroids(kc_ptr, b * skc_b + offs_t64[:, None] * skc_t, tmask, k_nb, k_bi, k_sh, k_hoff, k_hb,
                            k_tab_ptr, TABLE_STRIDE, UNPACK, LOOKUP, BLOCK_T, BLOCK_D, BLOCK_HB_K)
            if K_OUT:
                ck = _with_outliers(ck, tmask, offs_d, ko_cnt_ptr, b * sko_b + offs_t64 * sko_t,
                                    ko_st_ptr, b * skst_b + offs_t64 * skst_t, ko_idx_ptr, ko_val_ptr,
                                    h * HEAD_DIM, HEAD_DIM)
            sc = tl.dot(q, tl.trans(ck), input_precision="ieee")  # [BLOCK_G, BLOCK_T]
            if K_SCALE:
                sk = tl.load(ks_ptr + b * sks_b + offs_t64 * sks_t + h * sks_h, mask=tmask, other=0)
                if K_SCALE_LOG8:
                    sk = tl.load(ksl_ptr + sk.to(tl.int32))
                sc = sc * sk.to(tl.float32)[None, :]
            if K_POS:  # cos(a + r) = cos a cos r - sin a sin r, sin(a + r) = sin a cos r + cos a sin r
                base = (first_pos + t0).to(tl.float64) * freq  # [BLOCK_F], the tile's first position
                base = (base - 6.283185307179586 * tl.floor(base / 6.283185307179586)).to(tl.float32)
                cb = tl.cos(base)[None, :]
                sb = tl.sin(base)[None, :]
                sc += tl.dot(q_cos * cb + q_sin * sb, tl.trans(cos_rel), input_precision="ieee")
                sc += tl.dot(q_sin * cb - q_cos * sb, tl.trans(sin_rel), input_precision="ieee")
            sc = tl.where(tmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(sc - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            cv = _centroids(vc_ptr, b * svc_b + offs_t64[:, None] * svc_t, tmask, v_nb, v_bi, v_sh, v_hoff, v_hb,
                            v_tab_ptr, TABLE_STRIDE, UNPACK, LOOKUP, BLOCK_T, BLOCK_D, BLOCK_HB_V)
            if V_OUT:
                cv = _with_outliers(cv, tmask, offs_d, vo_cnt_ptr, b * svo_b + offs_t64 * svo_t,
                                    vo_st_ptr, b * svst_b + offs_t64 * svst_t, vo_idx_ptr, vo_val_ptr,
                                    h * HEAD_DIM, HEAD_DIM)
            if V_SCALE:
                sv = tl.load(vs_ptr + b * svs_b + offs_t64 * svs_t + h * svs_h, mask=tmask, other=0)
                if V_SCALE_LOG8:
                    sv = tl.load(vsl_ptr + sv.to(tl.int32))
                p = p * sv.to(tl.float32)[None, :]
            acc = acc * alpha[:, None] + tl.dot(p, cv, input_precision="ieee")
            m_i = m_new
    else:
        # the full-precision split (sinks, recent window, new token): plain attention in the original basis
        qh = h * G + offs_g
        q = tl.load(q_ptr + b * sq_b + qh[:, None] * sq_h + offs_d[None, :] * sq_d, mask=gd_mask, other=0.0)
        q = q.to(tl.float32) * qk_scale
        for t0 in range(0, W, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = offs_t < W
            if HAS_FP_MASK:
                keep = tl.load(fm_ptr + b * sfm_b + offs_t * sfm_t, mask=tmask, other=0)
                tmask = tmask & (keep != 0)
            td_mask = tmask[:, None] & dmask[None, :]
            kf = tl.load(kf_ptr + b * skf_b + h * skf_h + offs_t[:, None] * skf_t + offs_d[None, :] * skf_d,
                         mask=td_mask, other=0.0).to(tl.float32)
            sc = tl.dot(q, tl.trans(kf), input_precision="ieee")
            sc = tl.where(tmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(sc - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vf = tl.load(vf_ptr + b * svf_b + h * svf_h + offs_t[:, None] * svf_t + offs_d[None, :] * svf_d,
                         mask=td_mask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, vf, input_precision="ieee")
            m_i = m_new

    part = (bh * n_split + s) * G + offs_g
    tl.store(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gd_mask)
    tl.store(m_ptr + part, m_i, mask=gmask)
    tl.store(l_ptr + part, l_i, mask=gmask)


@triton.jit
def _stage2_kernel(
    acc_ptr, m_ptr, l_ptr,  # stage-1 partials: compressed splits 0..n_comp_splits-1, then the full-precision one
    qx_ptr,  # [B, Hkv, G, D + 1] float32: column D is q . mu_k
    dec_ptr, vmean_ptr,  # value decoder [Hkv, D, D], value mean [Hkv, D] float32
    out_ptr, so_b, so_h, so_d,  # [B, Hq, D], query head = h * G + g
    n_comp_splits, qk_scale,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    n_kv = tl.num_programs(1)
    n_split = n_comp_splits + HAS_WINDOW
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < G
    dmask = offs_d < HEAD_DIM
    gd_mask = gmask[:, None] & dmask[None, :]
    bh = b * n_kv + h

    # compressed splits: log-sum-exp merge in the rotated basis
    m_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for s in range(n_comp_splits):
        m_s = tl.load(m_ptr + (bh * n_split + s) * G + offs_g, mask=gmask, other=float("-inf"))
        m_max = tl.maximum(m_max, m_s)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_tot = tl.zeros([BLOCK_G], dtype=tl.float32)
    o_rot = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for s in range(n_comp_splits):
        part = (bh * n_split + s) * G + offs_g
        w = tl.exp2(tl.load(m_ptr + part, mask=gmask, other=float("-inf")) - m_use)
        l_tot += w * tl.load(l_ptr + part, mask=gmask, other=0.0)
        o_rot += w[:, None] * tl.load(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=gd_mask, other=0.0)
    has_c = l_tot > 0
    l_safe = tl.where(has_c, l_tot, 1.0)
    o_rot = o_rot / l_safe[:, None]
    qmu = tl.load(qx_ptr + (bh * G + offs_g) * (HEAD_DIM + 1) + HEAD_DIM, mask=gmask, other=0.0) * qk_scale
    lse_c = tl.where(has_c, m_use + tl.log2(l_safe) + qmu, float("-inf"))

    # un-rotate once: o = o_rot @ Dec_v + mu_v
    dec = tl.load(dec_ptr + h * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=dmask[:, None] & dmask[None, :], other=0.0)
    vmean = tl.load(vmean_ptr + h * HEAD_DIM + offs_d, mask=dmask, other=0.0)
    out = tl.dot(o_rot, dec, input_precision="ieee") + vmean[None, :]
    if HAS_WINDOW:
        # the full-precision split, in the original basis
        part = (bh * n_split + n_comp_splits) * G + offs_g
        m_w = tl.load(m_ptr + part, mask=gmask, other=float("-inf"))
        l_w = tl.load(l_ptr + part, mask=gmask, other=0.0)
        has_w = l_w > 0
        lw_safe = tl.where(has_w, l_w, 1.0)
        o_w = tl.load(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=gd_mask, other=0.0) / lw_safe[:, None]
        lse_w = tl.where(has_w, m_w + tl.log2(lw_safe), float("-inf"))
        top = tl.maximum(lse_c, lse_w)
        top = tl.where(top == float("-inf"), 0.0, top)
        wc = tl.exp2(lse_c - top)
        ww = tl.exp2(lse_w - top)
        denom = wc + ww
        out = (wc[:, None] * out + ww[:, None] * o_w) / tl.where(denom > 0, denom, 1.0)[:, None]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # round to nearest even by hand: the interpreter truncates fp32 -> bf16 (GPUs round); same bits everywhere
        bits = out.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        out = bits.to(tl.float32, bitcast=True)
    qh = h * G + offs_g
    tl.store(out_ptr + b * so_b + qh[:, None] * so_h + offs_d[None, :] * so_d, out.to(out_ptr.dtype.element_ty),
             mask=gd_mask)


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(max(1, n)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(batch: int, kv_heads: int, n: int, block_t: int, device: torch.device) -> int:
    """Enough splits to give every SM about two programs, but at least 4 tiles per split."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    want = max(1, -(-2 * sms // max(1, batch * kv_heads)))
    return max(1, min(want, -(-n // (4 * block_t)), 256))


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def _outlier_args(counts: torch.Tensor | None, starts: torch.Tensor | None, index: torch.Tensor | None,
                  values: torch.Tensor | None, dummy: torch.Tensor) -> tuple[object, ...]:
    """Stage-1 arguments of one side's outliers (placeholders when there are none: the kernel never reads them)."""
    if counts is None or starts is None or index is None or values is None:
        return (dummy, 0, 0, dummy, 0, 0, dummy, dummy)
    return (counts, counts.stride(0), counts.stride(1), starts, starts.stride(0), starts.stride(1), index, values)


def outlier_starts(counts: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` int32 offset of each token's first entry in token-major order (exclusive prefix sum)."""
    flat = counts.t().reshape(-1).to(torch.int32)
    return (torch.cumsum(flat, 0, dtype=torch.int32) - flat).view(counts.shape[1], counts.shape[0]).t()


def _side_outliers(o: Outliers | SlotOutliers | None) -> tuple[torch.Tensor | None, ...]:
    """(counts, starts, index, values) of one side for the op, or four Nones. Slot outliers keep their storage (the
    kernel reads ``index``/``values`` at the flat offsets ``starts``, so a view into a larger buffer is fine)."""
    if o is None or o.values.numel() == 0:
        return (None, None, None, None)
    if isinstance(o, SlotOutliers):
        return (o.counts, o.flat_starts(), o.index, o.values)
    return (o.counts, outlier_starts(o.counts), o.index, o.values)


def _decode_attention_launch(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor | None,
    k_scale_levels: torch.Tensor | None,
    k_nbits: torch.Tensor,
    k_byte_index: torch.Tensor,
    k_shift: torch.Tensor,
    k_head_offset: torch.Tensor,
    k_head_bytes: torch.Tensor,
    k_centroids: torch.Tensor,
    k_decoder_mean: torch.Tensor,
    k_max_head_bytes: int,
    k_out_counts: torch.Tensor | None,
    k_out_starts: torch.Tensor | None,
    k_out_index: torch.Tensor | None,
    k_out_values: torch.Tensor | None,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor | None,
    v_scale_levels: torch.Tensor | None,
    v_nbits: torch.Tensor,
    v_byte_index: torch.Tensor,
    v_shift: torch.Tensor,
    v_head_offset: torch.Tensor,
    v_head_bytes: torch.Tensor,
    v_centroids: torch.Tensor,
    v_decoder: torch.Tensor,
    v_mean: torch.Tensor,
    v_max_head_bytes: int,
    v_out_counts: torch.Tensor | None,
    v_out_starts: torch.Tensor | None,
    v_out_index: torch.Tensor | None,
    v_out_values: torch.Tensor | None,
    k_pos_first: torch.Tensor | None,
    k_pos_mean: torch.Tensor | None,
    k_pos_freq: torch.Tensor | None,
    k_fp: torch.Tensor | None,
    v_fp: torch.Tensor | None,
    comp_mask: torch.Tensor | None,
    comp_lengths: torch.Tensor | None,
    fp_mask: torch.Tensor | None,
    scaling: float,
    num_splits: int,
    block_t: int,
    unpack: str,
    lookup: str,
    num_warps: int,
) -> torch.Tensor:
    """Owns shapes, strides and grids (flat tensor arguments so it can be a ``torch.library`` op)."""
    b, hq, d = q.shape
    hkv = k_nbits.shape[0]
    g = hq // hkv
    n = k_codes.shape[1]
    w = k_fp.shape[2] if k_fp is not None else 0
    has_window = w > 0
    n_comp = num_splits if n > 0 else 0
    dev = q.device
    out = torch.empty(b, hq, d, dtype=q.dtype, device=dev)
    # the only host-side math: [q @ Dec_k^T, q . mu_k] in one batched product
    qf = q.float().view(b, hkv, g, d)
    qx = torch.einsum("bhgd,hed->bhge", qf, k_decoder_mean).contiguous()
    k_pos = k_pos_first is not None and n > 0
    if k_pos:  # q * m and q * rotate_half(m), for the per-token q . R_p m
        m_half = torch.cat([-k_pos_mean[:, d // 2 :], k_pos_mean[:, : d // 2]], dim=-1)
        qp = torch.stack([qf * k_pos_mean[None, :, None, :], qf * m_half[None, :, None, :]], dim=3)
        qp = (qp[..., : d // 2] + qp[..., d // 2 :]).contiguous()  # the halves share their frequencies
        kp = k_pos_first.to(torch.int64)
        freq = k_pos_freq[: d // 2].to(torch.float64).contiguous()
    else:
        qp = kp = freq = qx
    split_len = -(-max(n, 1) // max(n_comp, 1))
    split_len = -(-split_len // block_t) * block_t
    n_split = n_comp + int(has_window)
    acc = torch.empty(b, hkv, n_split, g, d, dtype=torch.float32, device=dev)
    m = torch.empty(b, hkv, n_split, g, dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    ks = k_scales if k_scales is not None else k_codes
    vs = v_scales if v_scales is not None else v_codes
    k_log8 = k_scales is not None and k_scale_levels is not None
    v_log8 = v_scales is not None and v_scale_levels is not None
    cm = comp_mask.view(torch.uint8) if comp_mask is not None and comp_mask.dtype == torch.bool else comp_mask
    fm = fp_mask.view(torch.uint8) if fp_mask is not None and fp_mask.dtype == torch.bool else fp_mask
    kf = k_fp if has_window else q
    vf = v_fp if has_window else q
    qk_scale = scaling * LOG2E
    block_g, block_d = _pow2(g), _pow2(d)
    if skip_launch(_stage1_kernel, q):
        return out
    if n_split:
        wrap_triton(_stage1_kernel)[(b, hkv, n_split)](
            qx,
            q, q.stride(0), q.stride(1), q.stride(2),
            k_codes, k_codes.stride(0), k_codes.stride(1),
            ks, *_strides(k_scales, 3),
            v_codes, v_codes.stride(0), v_codes.stride(1),
            vs, *_strides(v_scales, 3),
            k_scale_levels if k_log8 else qx, v_scale_levels if v_log8 else qx,
            *_outlier_args(k_out_counts, k_out_starts, k_out_index, k_out_values, k_codes),
            *_outlier_args(v_out_counts, v_out_starts, v_out_index, v_out_values, v_codes),
            k_nbits, k_byte_index, k_shift, k_head_offset, k_head_bytes, k_centroids,
            v_nbits, v_byte_index, v_shift, v_head_offset, v_head_bytes, v_centroids,
            cm if cm is not None else k_codes, *_strides(cm, 2),
            comp_lengths if comp_lengths is not None else k_codes, *_strides(comp_lengths, 1),
            kf, *(kf.stride() if has_window else (0,) * 4),
            vf, *(vf.stride() if has_window else (0,) * 4),
            fm if fm is not None else k_codes, *_strides(fm, 2),
            acc, m, l,
            qp, kp, kp.stride(0) if k_pos else 0, freq,
            n, w, split_len, n_comp, qk_scale,
            G=g,
            HEAD_DIM=d,
            K_POS=k_pos,
            K_SCALE=k_scales is not None,
            V_SCALE=v_scales is not None,
            K_SCALE_LOG8=k_log8,
            V_SCALE_LOG8=v_log8,
            K_OUT=k_out_counts is not None,
            V_OUT=v_out_counts is not None,
            HAS_COMP_MASK=cm is not None,
            HAS_FP_MASK=fm is not None,
            HAS_LENGTHS=comp_lengths is not None,
            UNPACK=unpack,
            LOOKUP=lookup,
            TABLE_STRIDE=TABLE_COLS,
            BLOCK_G=block_g,
            BLOCK_D=block_d,
            BLOCK_F=_pow2(d // 2),
            BLOCK_T=block_t,
            BLOCK_HB_K=_pow2(k_max_head_bytes),
            BLOCK_HB_V=_pow2(v_max_head_bytes),
            num_warps=num_warps,
        )
    wrap_triton(_stage2_kernel)[(b, hkv)](
        acc, m, l, qx,
        v_decoder, v_mean,
        out, out.stride(0), out.stride(1), out.stride(2),
        n_comp, qk_scale,
        G=g,
        HEAD_DIM=d,
        HAS_WINDOW=has_window,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out


OP_NAME = "spectralkv::decode_attention_packed"
_decode_attention_op = register_op(OP_NAME, _decode_attention_launch, _stage1_kernel)


def decode_attention_launch(
    q: torch.Tensor,
    kt: SpectralTables,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor | None,
    vt: SpectralTables,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor | None,
    k_fp: torch.Tensor | None,
    v_fp: torch.Tensor | None,
    comp_mask: torch.Tensor | None,
    fp_mask: torch.Tensor | None,
    scaling: float,
    *,
    k_outliers: Outliers | SlotOutliers | None = None,
    v_outliers: Outliers | SlotOutliers | None = None,
    comp_lengths: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_t: int = 32,
    unpack: str = "gather",
    lookup: str = "table",
    num_warps: int = 4,
) -> torch.Tensor:
    """Check and flatten the arguments and run the ``spectralkv::decode_attention_packed`` op (arguments as in
    :func:`decode_attention`, with the quantizers replaced by their :class:`SpectralTables` and the outliers given
    separately; ``k_positions`` ``[B, 1]``: each row's first compressed position, for position-centred keys, whose
    tables then carry the pre-RoPE mean and frequencies)."""
    if unpack not in UNPACK_MODES:
        raise ValueError(f"unpack must be one of {UNPACK_MODES}, got {unpack!r}.")
    if lookup not in LOOKUP_MODES:
        raise ValueError(f"lookup must be one of {LOOKUP_MODES}, got {lookup!r}.")
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t}.")
    if k_codes.stride(-1) != 1 or v_codes.stride(-1) != 1:
        raise ValueError("code rows must be contiguous in their last dimension.")
    b, hq, d = q.shape
    if num_splits is None:
        num_splits = default_num_splits(b, kt.num_heads, k_codes.shape[1], block_t, q.device)
    if k_fp is not None and k_fp.shape[2] == 0:
        k_fp = v_fp = fp_mask = None
    if k_codes.shape[1] == 0 and k_fp is None:
        raise ValueError("no tokens to attend to.")
    if (kt.position_mean is not None) != (k_positions is not None) and k_codes.shape[1] > 0:
        raise ValueError("position-centred keys need k_positions (each row's first position), and only they take it.")
    pos_args = (k_positions, kt.position_mean, kt.frequencies) if k_positions is not None else (None, None, None)
    return _decode_attention_op(
        q,
        k_codes, k_scales, kt.scale_levels, kt.nbits, kt.byte_index, kt.shift, kt.head_offset, kt.head_bytes,
        kt.centroids, kt.decoder_mean, kt.max_head_bytes, *_side_outliers(k_outliers),
        v_codes, v_scales, vt.scale_levels, vt.nbits, vt.byte_index, vt.shift, vt.head_offset, vt.head_bytes,
        vt.centroids, vt.decoder, vt.mean, vt.max_head_bytes, *_side_outliers(v_outliers), *pos_args,
        k_fp, v_fp, comp_mask, comp_lengths, fp_mask, float(scaling), max(1, int(num_splits)), int(block_t), unpack,
        lookup, int(num_warps),
    )


def decode_attention(
    q: torch.Tensor,
    k: PackedSide,
    v: PackedSide,
    k_fp: torch.Tensor | None = None,
    v_fp: torch.Tensor | None = None,
    comp_mask: torch.Tensor | None = None,
    fp_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    *,
    comp_lengths: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_t: int = 32,
    unpack: str = "gather",
    lookup: str = "table",
    num_warps: int = 4,
) -> torch.Tensor:
    """Triton version of :func:`spectralkv.kernels.ref.decode_attention_ref` (same arguments and result).

    Extra keywords: ``comp_lengths`` (as in the reference; tiles past a sequence's count are never read, so a
    preallocated buffer costs only the rows in use), ``num_splits`` (compressed-token splits per sequence and KV
    head; default from the SM count), ``block_t`` (tokens per tile, a power of two >= 16), ``unpack``
    (``"gather"`` or ``"register"``) and ``lookup`` (``"table"`` or ``"select"``), see the module docstring,
    ``num_warps`` (per program; untuned: at head_dim 128 stage 1 compiles to ~250 registers per thread with 4 warps
    and no spills, see :mod:`spectralkv.kernels.aot`).
    """
    _, _, _, d = _check(q, k, v, k_fp, v_fp)
    scaling = d**-0.5 if scaling is None else float(scaling)
    kt, vt = tables_for(k.quantizer, q.device), tables_for(v.quantizer, q.device)
    k_positions = k.positions if k.quantizer.position_centred and k.length else None
    if k.quantizer.position_centred and k.length and k_positions is None:
        k.token_positions()  # raises, saying what is missing
    return decode_attention_launch(q, kt, k.codes, k.scales, vt, v.codes, v.scales, k_fp, v_fp, comp_mask, fp_mask,
                                   scaling, k_outliers=k.outliers, v_outliers=v.outliers, comp_lengths=comp_lengths,
                                   k_positions=k_positions, num_splits=num_splits,
                                   block_t=block_t, unpack=unpack, lookup=lookup, num_warps=num_warps)


__all__ = ["LOOKUP_MODES", "OP_NAME", "UNPACK_MODES", "decode_attention", "decode_attention_launch",
           "default_num_splits", "outlier_starts"]
