"""Triton kernels against their PyTorch references, on CPU under ``TRITON_INTERPRET=1`` (set in conftest), or
compiled on a CUDA GPU with ``TRITON_INTERPRET=0`` (``scripts/gpu_check.sh``).

Shapes are tiny (the interpreter costs ~10 ms per program per tile) but odd: several bit mixes per layer (every
width 0..8, different regimes per head), GQA groups 1/3/4, head_dim 64, 128 and 80 (not a power of two), ragged and
left-padded masks, empty and fully masked splits. Integer codes must match exactly; floats get per-dtype tolerances
measured on these shapes (fp32: kernel vs reference max error ~3e-6 on outputs of order 1).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from spectralkv.kernels.layout import tables_for
from spectralkv.kernels.ref import PackedSide, coordinate_centroids, decode_attention_ref, decode_rotated_ref

from spectralkv import codebook as cb
from spectralkv.codebook import fit_codebooks
from spectralkv.packing import unpack
from spectralkv.quantizer import SpectralQuantizer

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)
# Under TRITON_INTERPRET=1 (conftest's default, CI) the kernels run on CPU tensors. With TRITON_INTERPRET=0 on a CUDA
# machine (scripts/gpu_check.sh) the same cases run compiled on the GPU, where the interpreter's leniency is gone.
DEV = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")

# -- quantizers with chosen bit mixes -----------------------------------------------------------------------------
# A mix is {bits: count or fraction of head_dim}, rounded to multiples of 8 (what the allocator guarantees); "rest"
# fills head_dim.
MIXES: dict[str, list[dict[int, Any]]] = {
    "2bit": [{2: "rest"}],
    "2.5bit": [{3: 0.5, 2: "rest"}, {4: 0.25, 2: "rest"}],
    "3bit": [{3: "rest"}, {4: 0.25, 3: 0.25, 2: "rest"}],
    "4bit": [{4: "rest"}, {5: 0.25, 3: "rest"}],
    "small": [{4: 8, 2: "rest"}, {8: 8, 0: "rest"}],
    "all-widths": [{8: 8, 7: 8, 6: 8, 5: 8, 4: 8, 3: 8, 1: 8, 0: "rest"}, {1: 0.5, 0: "rest"}, {7: 8, 3: "rest"}],
}
_CODEBOOKS: dict[int, torch.Tensor] = {}


def _codebooks(seed: int) -> torch.Tensor:
    if seed not in _CODEBOOKS:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(4096, generator=g)
        x = torch.where(torch.rand(4096, generator=g) < 0.1, 3 * x, x)  # heavier tails than a Gaussian
        _CODEBOOKS[seed] = fit_codebooks(x)
    return _CODEBOOKS[seed]


def _bits_row(mix: dict[int, Any], d: int, g: torch.Generator) -> torch.Tensor:
    counts = {b: (8 * round(n * d / 8) if isinstance(n, float) else n) for b, n in mix.items() if n != "rest"}
    rest = [b for b, n in mix.items() if n == "rest"]
    if rest:
        counts[rest[0]] = d - sum(counts.values())
    assert all(n % 8 == 0 and n >= 0 for n in counts.values()) and sum(counts.values()) == d, (mix, d)
    row = torch.cat([torch.full((n,), b, dtype=torch.uint8) for b, n in counts.items()])
    return row[torch.randperm(d, generator=g)]


LOG8_RANGE = (-3.0, 3.5)  # log2 scale range of the "log8" cases; make_tokens' scales fall inside it


def make_quantizer(heads: int, d: int, mix: str, token_scale: bool | str = True, seed: int = 0,
                   outlier_threshold: float | None = None, outlier_cap: int | None = None,
                   **position_terms: torch.Tensor) -> SpectralQuantizer:
    """``token_scale``: False, True (fp16 scales) or ``"log8"`` (one-byte log scales over :data:`LOG8_RANGE`)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(heads, d, d, generator=g)).Q
    eig = torch.logspace(1, -2, d).expand(heads, d) * (1 + torch.rand(heads, d, generator=g))
    mean = 2 * torch.randn(heads, d, generator=g)
    bits = torch.stack([_bits_row(MIXES[mix][h % len(MIXES[mix])], d, g) for h in range(heads)])
    return SpectralQuantizer(mean, basis, eig, _codebooks(seed % 2), bits, bool(token_scale),
                             outlier_threshold=outlier_threshold, outlier_cap=outlier_cap,
                             scale_range=LOG8_RANGE if token_scale == "log8" else None, **position_terms)


def make_tokens(q: SpectralQuantizer, b: int, n: int, seed: int = 0) -> torch.Tensor:
    """``[B, H, N, D]`` tokens distributed roughly like the calibration (mean + basis x sqrt(eigenvalues))."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, q.num_heads, n, q.head_dim, generator=g)
    z = z * (1 + torch.rand(b, q.num_heads, n, 1, generator=g))  # token-to-token scale variation
    return (z @ q.decoder[None] + q.mean[None, :, None, :]).to(DEV)


def codes_of(q: SpectralQuantizer, packed: torch.Tensor) -> torch.Tensor:
    """Unpacked codes ``[B, T, H, D]`` (packing order; -1 for 0-bit coordinates)."""
    b, t, _ = packed.shape
    out = torch.full((b, t, q.num_heads, q.head_dim), -1, dtype=torch.long, device=packed.device)
    for h in range(q.num_heads):
        for r in q.regimes[h]:
            o = q.head_byte_offsets[h] + r.byte_offset
            out[:, :, h, r.start : r.start + r.count] = unpack(packed[:, :, o : o + r.nbytes], r.bits, r.count)
    return out


def report(actual: torch.Tensor, expected: torch.Tensor, limit: int = 8) -> str:
    idx = (actual != expected).nonzero()
    rows = [f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item()}, expected {expected[tuple(i)].item()}"
            for i in idx[:limit]]
    return f"{len(idx)} of {actual.numel()} differ:\n" + "\n".join(rows)


# -- layout tables ----------------------------------------------------------------------------------------------------
LAYOUT_CASES = [(m, 64) for m in sorted(MIXES) if m != "small"] + [("small", 16), ("all-widths", 80), ("3bit", 128)]


@pytest.mark.parametrize("mix,d", LAYOUT_CASES, ids=str)
def test_layout_tables_decode_like_unpack(mix: str, d: int) -> None:
    """The per-coordinate (byte, shift, bits) tables the kernels use decode exactly what the regime unpacker does, and
    so do the PyTorch path's byte lookups (``tables.rows``)."""
    q = make_quantizer(3, d, mix, token_scale=d != 80, seed=d)
    x = make_tokens(q, 2, 9)
    packed, scales = q.encode(x)
    tables = tables_for(q, DEV)
    per_coordinate = coordinate_centroids(tables, packed)
    codes = codes_of(q, packed)
    for b in range(1, 9):  # the regime unpacker's codes, looked up in the b-bit codebook
        sel = (tables.nbits.view(1, 1, q.num_heads, q.head_dim) == b).expand_as(codes)
        expected = q.codebooks[b - 1][codes.clamp_min(0)]
        assert torch.equal(per_coordinate[sel], expected[sel]), f"{b}-bit coordinates"
    assert (per_coordinate[codes < 0] == 0).all()
    rows = tables.rows(packed)
    assert torch.equal(rows, per_coordinate.flatten(2)), report(rows, per_coordinate.flatten(2))
    got = decode_rotated_ref(tables, packed, scales)
    assert torch.equal(got, q.decode_rotated(packed, scales))


# -- write path -----------------------------------------------------------------------------------------------------
ENCODE_CASES = [  # (heads, head_dim, mix, token_scale, tokens)
    (2, 64, "all-widths", True, 37),
    (3, 64, "2.5bit", "log8", 23),
    (3, 64, "2.5bit", False, 19),
    (2, 80, "all-widths", True, 21),
    (1, 128, "3bit", True, 17),
    (2, 16, "small", True, 5),
]


@pytest.mark.parametrize("heads,d,mix,token_scale,t", ENCODE_CASES, ids=lambda v: str(v))
def test_encode_pack_stage_bit_exact(heads: int, d: int, mix: str, token_scale: bool | str, t: int) -> None:
    """Given the reference's rotated coordinates and scales, bucketize + pack reproduce encode() byte for byte."""
    from spectralkv.kernels.encode import encode_launch

    q = make_quantizer(heads, d, mix, token_scale, seed=heads + d)
    x = make_tokens(q, 2, t, seed=1)
    ref_packed, ref_scales = q.encode(x)
    z = q.rotate(x)
    packed, scales = encode_launch(tables_for(q, DEV), z, rotate=False, scales=ref_scales)
    assert torch.equal(packed, ref_packed), report(packed, ref_packed)
    # codes on exact boundaries and far outside the codebook range
    table = q.codebooks
    edge = torch.stack([cb.boundaries(table, 3)[0], cb.centroids(table, 8)[-1] * 10, -1e6 * torch.ones(())])
    edge = edge.to(DEV)
    z_edge = z.clone()
    z_edge[..., :3] = edge * (q.scale_values(ref_scales).transpose(1, 2)[..., None] if token_scale else 1)
    ref_edge, edge_scales = _encode_given(q, z_edge)
    packed_edge, _ = encode_launch(tables_for(q, DEV), z_edge, rotate=False, scales=edge_scales)
    assert torch.equal(packed_edge, ref_edge), report(packed_edge, ref_edge)


def _encode_given(q: SpectralQuantizer, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """encode() starting from given rotated coordinates (rotate() temporarily returns z)."""
    original = q.rotate
    try:
        q.rotate = lambda x, positions=None: z  # type: ignore[method-assign]
        return q.encode(z)
    finally:
        q.rotate = original  # type: ignore[method-assign]


@pytest.mark.parametrize("heads,d,mix,token_scale,t", ENCODE_CASES[:5], ids=lambda v: str(v))
def test_encode_full_path(heads: int, d: int, mix: str, token_scale: bool | str, t: int) -> None:
    """Rotation inside the kernel: scales match, and codes match wherever z is not within 1e-5 of a boundary.

    The kernel's fp32 product sums in another order than torch.einsum, so a coordinate within an ulp of a boundary
    may legitimately flip (none did on CPU in 1M coordinates; on GPU expect a few per million)."""
    from spectralkv.kernels.encode import spectral_encode

    q = make_quantizer(heads, d, mix, token_scale, seed=heads * d)
    x = make_tokens(q, 2, t, seed=2).to(torch.bfloat16)
    ref_packed, ref_scales = q.encode(x)
    packed, scales = spectral_encode(q, x)
    same_scale = torch.ones(2, t, heads, dtype=torch.bool, device=DEV)
    if token_scale:  # within one fp16 ulp, or one log8 level (the mean square's summation order differs)
        ulp = (ref_scales.float().abs() * 2**-10).clamp_min(2**-24) if token_scale is True else 1
        assert scales.dtype == ref_scales.dtype == q.scale_dtype
        assert ((scales.float() - ref_scales.float()).abs() <= ulp).all(), report(scales, ref_scales)
        same_scale = scales == ref_scales
        assert same_scale.float().mean() > 0.99
    z = q.rotate(x)
    if token_scale:
        z = z / q.scale_values(ref_scales).transpose(1, 2)[..., None]
    near = torch.zeros(2, heads, t, d, dtype=torch.bool, device=DEV)
    for h in range(heads):
        for r in q.regimes[h]:
            bnd = cb.boundaries(q.codebooks, r.bits).to(DEV)
            zz = z[:, h, :, r.start : r.start + r.count]
            near[:, h, :, r.start : r.start + r.count] = (zz[..., None] - bnd).abs().amin(-1) <= 1e-5
    got, want = codes_of(q, packed), codes_of(q, ref_packed)
    check = same_scale[..., None] & ~near.permute(0, 2, 1, 3)
    assert torch.equal(got[check], want[check]), report(got[check], want[check])
    assert (got != want).float().mean() < 1e-3


@pytest.mark.parametrize("heads,d,token_scale,thr,cap", [(2, 64, True, 2.0, 6), (3, 128, False, 2.5, None),
                                                         (2, 64, "log8", 2.0, None)], ids=str)
def test_encode_with_outliers(heads: int, d: int, token_scale: bool | str, thr: float, cap: int | None) -> None:
    """The write kernel's coordinates give the same exact outliers as the quantizer (its codes are checked above)."""
    from spectralkv.kernels.encode import spectral_encode_with_outliers

    q = make_quantizer(heads, d, "2.5bit", token_scale, seed=d, outlier_threshold=thr, outlier_cap=cap)
    x = make_tokens(q, 2, 19, seed=4)
    ref_packed, ref_scales, ref_o = q.encode_with_outliers(x)
    packed, scales, o = spectral_encode_with_outliers(q, x)
    assert ref_o is not None and o is not None and ref_o.values.numel() > 19
    assert torch.equal(o.counts, ref_o.counts) and torch.equal(o.index, ref_o.index)
    torch.testing.assert_close(o.values, ref_o.values, atol=2e-3, rtol=1e-3)
    assert (codes_of(q, packed) != codes_of(q, ref_packed)).float().mean() < 1e-3
    plain = make_quantizer(heads, d, "2.5bit", token_scale, seed=d)
    assert spectral_encode_with_outliers(plain, x)[2] is None


def test_encode_empty_and_shapes() -> None:
    from spectralkv.kernels.encode import encode_launch, spectral_encode

    q = make_quantizer(2, 64, "3bit")
    packed, scales = spectral_encode(q, torch.zeros(3, 2, 0, 64, device=DEV))
    assert packed.shape == (3, 0, q.row_bytes) and scales.shape == (3, 0, 2)
    with pytest.raises(ValueError, match="heads"):
        spectral_encode(q, torch.zeros(1, 3, 4, 64, device=DEV))
    with pytest.raises(ValueError, match="block_t"):
        encode_launch(tables_for(q, DEV), torch.zeros(1, 2, 4, 64, device=DEV), block_t=24)


# -- decode attention -------------------------------------------------------------------------------------------------
def make_case(
    g: int, d: int, mix_k: str, mix_v: str, n: int, window: int, *, b: int = 2, hkv: int = 2, seed: int = 0,
    k_scale: bool | str = True, v_scale: bool | str = True, dtype: torch.dtype = torch.float32, masks: str = "none",
    outliers: tuple[float, int | None] | None = None,
) -> dict[str, Any]:
    """Query, compressed K/V (encoded by the reference), full-precision K/V and masks for one decode step.

    ``outliers``: (threshold, cap) of exact outlier coordinates on both sides (None: none)."""
    thr, cap = outliers if outliers is not None else (None, None)
    qk = make_quantizer(hkv, d, mix_k, k_scale, seed=seed, outlier_threshold=thr, outlier_cap=cap)
    qv = make_quantizer(hkv, d, mix_v, v_scale, seed=seed + 1, outlier_threshold=thr, outlier_cap=cap)
    kc, ks, ko = qk.encode_with_outliers(make_tokens(qk, b, n, seed=seed + 2))
    vc, vs, vo = qv.encode_with_outliers(make_tokens(qv, b, n, seed=seed + 3))
    gen = torch.Generator().manual_seed(seed + 4)
    # queries correlated with the key mean (as real queries are), so scores are not all alike
    q = (torch.randn(b, hkv * g, d, generator=gen) + 0.3 * qk.mean.repeat_interleave(g, 0)) * d**-0.25
    k_fp = (torch.randn(b, hkv, window, d, generator=gen) + qk.mean[:, None]).to(dtype)
    v_fp = torch.randn(b, hkv, window, d, generator=gen).to(dtype)
    comp_mask = fp_mask = None
    if masks == "ragged":  # row 0 left-padded into the compressed region, row 1 shorter (ragged end)
        comp_mask = torch.ones(b, n, dtype=torch.bool)
        comp_mask[0, : n // 3] = False
        comp_mask[-1, n - n // 4 :] = False
        fp_mask = torch.ones(b, window, dtype=torch.bool)
        fp_mask[0, :2] = False  # the padded sinks
    elif masks == "row-empty":  # one sequence with no visible compressed token at all
        comp_mask = torch.ones(b, n, dtype=torch.bool)
        comp_mask[0] = False
    elif masks == "holes":  # arbitrary pattern
        comp_mask = torch.rand(b, n, generator=gen) > 0.3
    def dev(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(DEV)

    return dict(q=dev(q.to(dtype)), k=PackedSide(qk, kc, ks, ko), v=PackedSide(qv, vc, vs, vo), k_fp=dev(k_fp),
                v_fp=dev(v_fp), comp_mask=dev(comp_mask), fp_mask=dev(fp_mask))


def sdpa_over_decoded(case: dict[str, Any]) -> torch.Tensor:
    """Plain SDPA over SpectralQuantizer.decode output + the full-precision tokens (fp32)."""
    k, v = case["k"], case["v"]
    keys = torch.cat([k.quantizer.decode(k.codes, k.scales, torch.float32, k.outliers,
                                         positions=k.token_positions()), case["k_fp"].float()], 2)
    values = torch.cat([v.quantizer.decode(v.codes, v.scales, torch.float32, v.outliers), case["v_fp"].float()], 2)
    b, n = k.codes.shape[:2]
    w = case["k_fp"].shape[2]
    cm = case["comp_mask"] if case["comp_mask"] is not None else torch.ones(b, n, dtype=torch.bool, device=DEV)
    fm = case["fp_mask"] if case["fp_mask"] is not None else torch.ones(b, w, dtype=torch.bool, device=DEV)
    mask = torch.cat([cm, fm], 1)[:, None, None, :]
    q = case["q"].float()[:, :, None]
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)[:, :, 0]


REF_CASES = [  # (g, d, mix_k, mix_v, n, window, k_scale, v_scale, masks)
    (1, 64, "3bit", "2bit", 40, 6, "log8", True, "none"),
    (3, 64, "all-widths", "2.5bit", 33, 5, True, False, "ragged"),
    (4, 80, "4bit", "all-widths", 24, 3, False, True, "holes"),
    (4, 64, "2bit", "2bit", 0, 4, True, True, "none"),
]


@pytest.mark.parametrize("g,d,mix_k,mix_v,n,window,k_scale,v_scale,masks", REF_CASES, ids=lambda v: str(v))
def test_reference_equals_sdpa_over_decode(g: int, d: int, mix_k: str, mix_v: str, n: int, window: int,
                                           k_scale: bool | str, v_scale: bool | str, masks: str) -> None:
    case = make_case(g, d, mix_k, mix_v, n, window, k_scale=k_scale, v_scale=v_scale, masks=masks)
    torch.testing.assert_close(decode_attention_ref(**case), sdpa_over_decoded(case), atol=1e-5, rtol=1e-5)


ROWS_CASES = [  # (g, d, hkv, mix_k, mix_v, n, window, scales, masks, outliers, dtype)
    (1, 64, 2, "3bit", "2bit", 40, 6, (True, True), "none", None, torch.float32),
    (3, 64, 2, "all-widths", "2.5bit", 33, 5, ("log8", False), "ragged", (2.0, 8), torch.float32),
    (4, 80, 2, "4bit", "all-widths", 24, 3, (False, "log8"), "holes", None, torch.bfloat16),
    (4, 128, 3, "all-widths", "3bit", 29, 3, (False, True), "row-empty", (2.5, None), torch.float32),
    (8, 64, 1, "small", "small", 17, 0, (True, True), "none", (1.5, 3), torch.float32),
    (4, 64, 2, "2bit", "2bit", 0, 4, (True, True), "none", None, torch.float32),
]


@pytest.mark.parametrize("g,d,hkv,mix_k,mix_v,n,window,scales,masks,outliers,dtype", ROWS_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_cpu_attention_on_grouped_rows_equals_reference(g: int, d: int, hkv: int, mix_k: str, mix_v: str, n: int,
                                                        window: int, scales: tuple[bool | str, bool | str], masks: str,
                                                        outliers: Any, dtype: torch.dtype) -> None:
    """The PyTorch path's attention on the row decoder's grouped columns (block queries) gives the reference's
    numbers, with and without scales, outliers, masks, full-precision tokens and compressed tokens."""
    from spectralkv.kernels.cpu_attention import decode_attention_rows

    d_small = 16 if mix_k == "small" else d
    case = make_case(g, d_small, mix_k, mix_v, n, window, hkv=hkv, k_scale=scales[0], v_scale=scales[1],
                     masks=masks, outliers=outliers, dtype=dtype, seed=g + n)
    if window == 0:
        case = {**case, "k_fp": None, "v_fp": None, "fp_mask": None}
    got, expected = decode_attention_rows(**case), decode_attention_ref(**case)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-5 if dtype == torch.float32 else 1e-2,
                               rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_cpu_attention_with_positioned_keys_equals_reference() -> None:
    from spectralkv.kernels.cpu_attention import decode_attention_rows

    for first, share in (([4, 1000], False), ([9, 9], True)):
        case = positioned_case(3, 64, "2.5bit", 37, 5, first, masks="ragged")
        k = case["k"]
        case["k"] = PackedSide(k.quantizer, k.codes, k.scales, k.outliers, k.positions, share)
        torch.testing.assert_close(decode_attention_rows(**case), decode_attention_ref(**case), atol=2e-5, rtol=1e-5)


OUTLIER_CASES = [  # (g, d, hkv, mix_k, mix_v, n, window, scales, masks, outliers); 3 x 128 coordinates: int16 index
    (3, 64, 2, "2bit", "2.5bit", 37, 5, ("log8", True), "ragged", (2.0, 8)),
    (4, 128, 3, "all-widths", "3bit", 29, 3, (False, True), "holes", (2.5, None)),
    (1, 80, 2, "4bit", "2bit", 20, 2, (True, False), "none", (1.5, 3)),  # the cap binds on most tokens
]


@pytest.mark.parametrize("g,d,hkv,mix_k,mix_v,n,window,scales,masks,outliers", OUTLIER_CASES, ids=lambda v: str(v))
def test_reference_with_outliers_equals_sdpa_over_decode(g: int, d: int, hkv: int, mix_k: str, mix_v: str, n: int,
                                                         window: int, scales: tuple[bool | str, bool | str], masks: str,
                                                         outliers: tuple[float, int | None]) -> None:
    case = make_case(g, d, mix_k, mix_v, n, window, hkv=hkv, k_scale=scales[0], v_scale=scales[1], masks=masks,
                     outliers=outliers)
    ko, vo = case["k"].outliers, case["v"].outliers
    assert ko is not None and vo is not None and ko.values.numel() > n and vo.values.numel() > n
    if outliers[1] is not None:
        assert int(ko.counts.max()) <= outliers[1]
    got = decode_attention_ref(**case)
    torch.testing.assert_close(got, sdpa_over_decoded(case), atol=1e-5, rtol=1e-5)
    plain = {**case, "k": PackedSide(case["k"].quantizer, case["k"].codes, case["k"].scales),
             "v": PackedSide(case["v"].quantizer, case["v"].codes, case["v"].scales)}
    assert (got - decode_attention_ref(**plain)).abs().max() > 1e-3  # the outliers change the result


def test_reference_without_window_and_scaling() -> None:
    case = make_case(2, 64, "3bit", "3bit", 20, 1)
    case["k_fp"] = case["v_fp"] = None
    expected = make_case(2, 64, "3bit", "3bit", 20, 1)
    expected["fp_mask"] = torch.zeros(2, 1, dtype=torch.bool, device=DEV)
    torch.testing.assert_close(decode_attention_ref(**case), sdpa_over_decoded(expected), atol=1e-5, rtol=1e-5)
    out = decode_attention_ref(**{**case, "scaling": 0.05})
    assert not torch.allclose(out, decode_attention_ref(**case))


# The kernel may be off the fp32 reference by at most twice what the same-dtype reference is off (flash-attention's
# rule; in bf16/fp16 both are the final rounding) plus this floor. Measured on KERNEL_CASES: fp32 max error <= 3.4e-6
# on outputs up to 7; bf16 and fp16 errors equal the reference's.
ABS_FLOOR = 2e-5

KERNEL_CASES = [  # (g, d, mix_k, mix_v, n, window, splits, block_t, masks, dtype, unpack, scales)
    (1, 64, "2bit", "2bit", 50, 4, 1, 16, "none", torch.float32, "gather", ("log8", "log8")),
    (3, 64, "all-widths", "2.5bit", 70, 37, 3, 16, "ragged", torch.float32, "gather", (True, False)),
    (4, 64, "3bit", "4bit", 45, 3, 7, 16, "none", torch.float32, "register", (False, True)),  # 4 empty splits
    (4, 128, "4bit", "3bit", 40, 5, 2, 32, "holes", torch.bfloat16, "gather", (True, "log8")),
    (3, 80, "all-widths", "all-widths", 30, 2, 2, 16, "row-empty", torch.float16, "register", (True, True)),
    (1, 64, "2.5bit", "2bit", 1, 1, 1, 16, "none", torch.float32, "gather", (False, False)),
]


@pytest.mark.parametrize("g,d,mix_k,mix_v,n,window,splits,block_t,masks,dtype,unpack,scales", KERNEL_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_decode_attention_kernel(g: int, d: int, mix_k: str, mix_v: str, n: int, window: int, splits: int,
                                 block_t: int, masks: str, dtype: torch.dtype, unpack: str,
                                 scales: tuple[bool | str, bool | str]) -> None:
    from spectralkv.kernels.decode_attention import decode_attention

    case = make_case(g, d, mix_k, mix_v, n, window, k_scale=scales[0], v_scale=scales[1], dtype=dtype, masks=masks,
                     seed=g + d + n)
    out = decode_attention(**case, num_splits=splits, block_t=block_t, unpack=unpack)
    assert out.dtype == dtype and out.shape == case["q"].shape
    exact = decode_attention_ref(**{**case, "q": case["q"].float(), "k_fp": case["k_fp"].float(),
                                    "v_fp": case["v_fp"].float()})
    same_dtype_err = (decode_attention_ref(**case).float() - exact).abs().max().item()
    err = (out.float() - exact).abs()
    assert err.max().item() <= 2 * same_dtype_err + ABS_FLOOR, (
        f"max error {err.max().item():.3g} at {tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))}, "
        f"reference in {dtype} is off by {same_dtype_err:.3g}"
    )


@pytest.mark.parametrize("g,d,hkv,mix_k,mix_v,n,window,scales,masks,outliers", OUTLIER_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("splits,block_t,unpack", [(3, 16, "gather"), (1, 32, "register")], ids=str)
def test_decode_attention_kernel_with_outliers(g: int, d: int, hkv: int, mix_k: str, mix_v: str, n: int, window: int,
                                               scales: tuple[bool | str, bool | str], masks: str,
                                               outliers: tuple[float, int | None], splits: int, block_t: int,
                                               unpack: str) -> None:
    from spectralkv.kernels.decode_attention import decode_attention, outlier_starts

    case = make_case(g, d, mix_k, mix_v, n, window, hkv=hkv, k_scale=scales[0], v_scale=scales[1], masks=masks,
                     outliers=outliers)
    counts = case["k"].outliers.counts
    starts = outlier_starts(counts)
    flat = counts.t().reshape(-1).long()  # token-major: (t, b)
    assert starts.t().reshape(-1).tolist() == (flat.cumsum(0) - flat).tolist()
    out = decode_attention(**case, num_splits=splits, block_t=block_t, unpack=unpack)
    torch.testing.assert_close(out, decode_attention_ref(**case), atol=ABS_FLOOR, rtol=1e-5)


@pytest.mark.parametrize("case", [KERNEL_CASES[0], KERNEL_CASES[1], KERNEL_CASES[4], ("outliers",)],
                         ids=["2bit", "all-widths-ragged", "fp16-register-row-empty", "outliers"])
def test_select_lookup_equals_table(case: tuple[Any, ...]) -> None:
    """The ``select`` centroid mode (1-2 bit levels in registers, wider ones from the table) gives the table mode's
    output bit for bit: it reads the same centroids, and masked lanes only meet zero probabilities."""
    from spectralkv.kernels.decode_attention import decode_attention

    if case[0] == "outliers":
        g, d, hkv, mix_k, mix_v, n, window, scales, masks, outliers = OUTLIER_CASES[0]
        inputs = make_case(g, d, mix_k, mix_v, n, window, hkv=hkv, k_scale=scales[0], v_scale=scales[1],
                           masks=masks, outliers=outliers)
        opts: dict[str, Any] = dict(num_splits=3, block_t=16, unpack="gather")
    else:
        g, d, mix_k, mix_v, n, window, splits, block_t, masks, dtype, unpack, scales = case
        inputs = make_case(g, d, mix_k, mix_v, n, window, k_scale=scales[0], v_scale=scales[1], dtype=dtype,
                           masks=masks, seed=g + d + n)
        opts = dict(num_splits=splits, block_t=block_t, unpack=unpack)
    bits = torch.cat([inputs["k"].quantizer.bits.flatten(), inputs["v"].quantizer.bits.flatten()])
    assert ((bits == 1) | (bits == 2)).any()  # the select path is taken
    table = decode_attention(**inputs, lookup="table", **opts)
    select = decode_attention(**inputs, lookup="select", **opts)
    assert torch.equal(select, table), (select - table).abs().max()
    with pytest.raises(ValueError, match="lookup"):
        decode_attention(**inputs, lookup="shared")


@pytest.mark.parametrize("masks", ["none", "holes"])
@pytest.mark.parametrize("lengths", [(70, 23), (0, 41), (70, 70)], ids=str)
def test_comp_lengths_read_only_rows_in_use(lengths: tuple[int, int], masks: str) -> None:
    """``comp_lengths`` (a preallocated buffer's rows in use): the reference equals attention over each sequence's
    rows cut to its count, and the kernel (3 splits, so whole splits lie past a count) equals the reference; rows past
    the count are garbage here, so reading any of them would show."""
    from spectralkv.kernels.decode_attention import decode_attention

    case = make_case(4, 64, "2.5bit", "3bit", 70, 5, masks=masks, seed=11)
    lens = torch.tensor(lengths, device=DEV)
    garbage = {side: PackedSide(p.quantizer, p.codes.clone(), p.scales.clone()) for side in ("k", "v")
               for p in [case[side]]}
    for side in ("k", "v"):
        for row, n in enumerate(lengths):
            garbage[side].codes[row, n:] = 255
            garbage[side].scales[row, n:] = 1e4
    ref = decode_attention_ref(**{**case, **garbage}, comp_lengths=lens)
    for row, n in enumerate(lengths):
        cut = {side: PackedSide(case[side].quantizer, case[side].codes[row : row + 1, :n],
                                case[side].scales[row : row + 1, :n]) for side in ("k", "v")}
        one = {key: None if t is None else t[row : row + 1] for key, t in case.items() if key not in ("k", "v")}
        if one["comp_mask"] is not None:
            one["comp_mask"] = one["comp_mask"][:, :n]
        torch.testing.assert_close(ref[row : row + 1], decode_attention_ref(**one, **cut), atol=1e-5, rtol=1e-5)
    out = decode_attention(**{**case, **garbage}, comp_lengths=lens, num_splits=3, block_t=16)
    torch.testing.assert_close(out, ref, atol=ABS_FLOOR, rtol=1e-4)


def test_decode_attention_kernel_without_window_and_empty() -> None:
    from spectralkv.kernels.decode_attention import decode_attention

    case = make_case(2, 64, "3bit", "3bit", 20, 1, b=1)
    no_window = {**case, "k_fp": None, "v_fp": None, "fp_mask": None}
    torch.testing.assert_close(decode_attention(**no_window, num_splits=2), decode_attention_ref(**no_window),
                               atol=2e-5, rtol=1e-5)
    empty = {**case, "k": PackedSide(case["k"].quantizer, case["k"].codes[:, :0], case["k"].scales[:, :0]),
             "v": PackedSide(case["v"].quantizer, case["v"].codes[:, :0], case["v"].scales[:, :0]),
             "comp_mask": None}
    torch.testing.assert_close(decode_attention(**empty), decode_attention_ref(**empty), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unpack"):
        decode_attention(**case, unpack="shuffle")


def test_ops_registered() -> None:
    import spectralkv.kernels.decode_attention  # noqa: F401
    import spectralkv.kernels.encode  # noqa: F401

    assert hasattr(torch.ops.spectralkv, "decode_attention_packed")
    assert hasattr(torch.ops.spectralkv, "encode_packed")


def test_kernels_compile_for_h100() -> None:
    """The interpreter is lenient: check that the GPU compiler (with the ptxas in the Triton wheel) lowers every
    kernel to an sm_90 cubin without spills. Runs in a subprocess without TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from spectralkv.kernels.aot import compile_all\n"
            "for c in compile_all(90, (64,)): print(c.name, c.spills)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    assert sum(line.startswith(("stage1", "stage2", "encode")) for line in lines) == 10, out.stdout  # 7 stage-1
    assert all(line.split()[-1] in ("0", "None") for line in lines if line), out.stdout


def test_ops_are_opaque_to_torch_export() -> None:
    """``torch.export`` (what torch.compile and CUDA-graph capture build on) records each kernel as one
    ``spectralkv::`` op instead of tracing into the launcher, once a quantizer's tables exist (built on first use,
    they read tensor values on the host). Fake tensors only, so no GPU is needed; without TRITON_INTERPRET, whose
    kernels run eagerly even under fake tensors."""
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_kernels import make_case\n"
        "from spectralkv.kernels.decode_attention import decode_attention\n"
        "from spectralkv.kernels.encode import spectral_encode\n"
        "from spectralkv.kernels.layout import tables_for\n"
        "case = make_case(2, 64, '3bit', '2bit', 40, 5)\n"
        "k, v = case['k'], case['v']\n"
        "tables_for(k.quantizer, case['q'].device), tables_for(v.quantizer, case['q'].device)\n"
        "class Decode(torch.nn.Module):\n"
        "    def forward(self, q, kf, vf):\n"
        "        return decode_attention(q, k, v, kf, vf, num_splits=2, block_t=16)\n"
        "class Encode(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return spectral_encode(k.quantizer, x)\n"
        "for m, args in ((Decode(), (case['q'], case['k_fp'], case['v_fp'])), (Encode(), (case['k_fp'],))):\n"
        "    ep = torch.export.export(m, args)\n"
        "    print([str(n.target) for n in ep.graph.nodes if n.op == 'call_function'])\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    decode_ops, encode_ops = out.stdout.strip().splitlines()
    assert decode_ops == "['spectralkv.decode_attention_packed.default']", out.stdout
    assert encode_ops.startswith("['spectralkv.encode_packed.default'"), out.stdout


# -- integration ------------------------------------------------------------------------------------------------------
def test_import_does_not_load_triton() -> None:
    """Importing spectralkv (fused integration included) loads no kernel module and, by itself, not Triton.

    With ``hqq`` installed, transformers' ``cache_utils`` imports it and it imports Triton: that is measured first
    and then only our own kernel modules are checked."""
    code = (
        "import sys, transformers, transformers.cache_utils, transformers.modeling_utils\n"
        "before = 'triton' in sys.modules\n"
        "import spectralkv, spectralkv.kernels, spectralkv.kernels.ref, spectralkv.kernels.layout, spectralkv.fused\n"
        "kernels = sorted(m for m in sys.modules if m.startswith('spectralkv.kernels.') and m.split('.')[-1] in "
        "('encode', 'decode_attention', 'aot'))\n"
        "print(before, 'triton' in sys.modules, kernels)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, kernels = out.stdout.strip().split(" ", 2)
    assert kernels == "[]", out.stdout
    assert before == "True" or after == "False", out.stdout


@pytest.mark.parametrize("installed", [True, False])
def test_checkout_root_does_not_shadow_hub_kernels(tmp_path: Path, installed: bool) -> None:
    """From the repository root (on ``sys.path`` with ``python -m``/``-c``) ``import kernels`` must give the installed
    Hugging Face ``kernels`` package, not this repo's ``kernels/`` folder: transformers >= 5.25 imports it and failed
    on ours. A stand-in package on ``PYTHONPATH`` plays the installed one; without one (an empty ``PYTHONPATH``
    entry, and site-packages left out with ``-S``), our folder stays an empty package without a version."""
    root = Path(__file__).resolve().parents[1]
    if installed:
        (tmp_path / "kernels").mkdir()
        (tmp_path / "kernels" / "__init__.py").write_text("__version__ = '0.19.1'\nfrom .sub import WHO\n")
        (tmp_path / "kernels" / "sub.py").write_text("WHO = 'installed'\n")
    code = "import kernels, sys; print(getattr(kernels, 'WHO', 'ours'), getattr(kernels, '__version__', None), " \
           "sys.modules['kernels'] is kernels)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    args = [sys.executable] + ([] if installed else ["-S"]) + ["-c", code]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=root, env=env)
    assert out.stdout.split() == (["installed", "0.19.1", "True"] if installed else ["ours", "None", "True"])

def _generate(model: Any, cache: Any, attn: str, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    model.set_attn_implementation(attn)
    return model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=5,
                          do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)


@pytest.fixture()
def counted_attend(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the backend of every fused decode call."""
    from spectralkv import fused

    calls: list[str] = []
    original = fused.DecodeSnapshot.attend

    def attend(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(self.backend)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fused.DecodeSnapshot, "attend", attend)
    return calls


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("flush_block", [1, 3], ids=lambda f: f"flush_block={f}")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_generate_matches_unfused(tiny_llama: Any, tiny_llama_calibration: Any, backend: str,
                                        flush_block: int, padded: bool, counted_attend: list[str]) -> None:
    """Greedy decode: fused attention (reference or Triton kernels) vs the unfused cache + SDPA; with ``flush_block``
    3 the kernel also sees full-precision windows of varying length. Padded and unpadded: the window is kept as a view
    of the kernel's tensors in both, next to the padded rows' sink round trips."""
    from spectralkv import SpectralKVCache
    from spectralkv.fused import FUSED_ATTENTION, FusedSpectralKVCache, enable_fused

    model, cfg = tiny_llama, tiny_llama_calibration.without_outliers()  # what the kernels read
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 256, (2, 28), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :9] = 0  # left padding reaching past the sinks into the compressed tokens
    if DEV.type == "cuda":  # compiled kernels need the model on the GPU (a copy: the fixture is shared)
        model, ids, mask = copy.deepcopy(model).to(DEV), ids.to(DEV), mask.to(DEV)
    previous = model.config._attn_implementation
    try:
        want = _generate(model, SpectralKVCache(model, cfg, window=8, sink_tokens=2, flush_block=flush_block),
                         previous, ids, mask)
        assert enable_fused(model) == previous
        cache = FusedSpectralKVCache(model, cfg, window=8, sink_tokens=2, backend=backend, flush_block=flush_block)
        got = _generate(model, cache, FUSED_ATTENTION, ids, mask)
    finally:
        model.set_attn_implementation(previous)
    assert cache.memory_report()["compressed_tokens"] > 16  # compression really active
    assert counted_attend == [backend] * 4 * 2  # every decode step (4 after prefill) of both layers ran fused
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits, strict=True)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")


def test_decode_step_keeps_the_window_as_a_view() -> None:
    """Steady-state fused decode step: two concatenations (the kernel's full-precision keys and values) and no
    window copy; the window afterwards is the tail of those tensors, and the same tokens as the general path keeps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from spectralkv.fused import FusedCompressedLayer

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    qk, qv = make_quantizer(2, 16, "2bit", seed=0), make_quantizer(2, 16, "2bit", seed=1)
    fast = FusedCompressedLayer(qk, qv, sink_tokens=1, window=4, backend="torch")
    general = FusedCompressedLayer(qk, qv, sink_tokens=1, window=4, backend="torch")
    gen = torch.Generator().manual_seed(0)
    prefill = torch.randn(1, 2, 10, 16, generator=gen), torch.randn(1, 2, 10, 16, generator=gen)
    fast.update(*prefill)
    general.update(*prefill)
    for step in range(3):
        k, v = torch.randn(1, 2, 1, 16, generator=gen), torch.randn(1, 2, 1, 16, generator=gen)
        counter = Count()
        with counter:
            hk, _ = fast.update(k, v)
        general.ingest(k, v)
        assert counter.ops.count("cat") == 2, counter.ops
        assert "clone" not in counter.ops, counter.ops
        assert fast.keys.untyped_storage().data_ptr() == hk.snapshot.k_fp.untyped_storage().data_ptr()
        assert torch.equal(fast.keys, general.keys) and torch.equal(fast.values, general.values), step
        assert torch.equal(fast.key_store.codes.view(), general.key_store.codes.view())
        assert fast.get_seq_length() == general.get_seq_length() == 11 + step


def test_handles_survive_other_attention(tiny_llama: Any, tiny_llama_calibration: Any) -> None:
    """A fused cache under plain SDPA still gives the unfused results (the handles decode themselves)."""
    from spectralkv import SpectralKVCache
    from spectralkv.fused import FusedSpectralKVCache, PackedKV

    model, cfg = tiny_llama, tiny_llama_calibration.without_outliers()  # what the kernels read
    ids = torch.randint(2, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    attn = model.config._attn_implementation
    want = _generate(model, SpectralKVCache(model, cfg, window=4, sink_tokens=1), attn, ids, mask)
    cache = FusedSpectralKVCache(model, cfg, window=4, sink_tokens=1, backend="torch")
    got = _generate(model, cache, attn, ids, mask)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-5, rtol=1e-5)
    k, v = cache.layers[0].update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    total = cache.layers[0].get_seq_length()
    assert isinstance(k, PackedKV) and k.shape == (1, 2, total, 16) and torch.cat([k], 2).shape == (1, 2, total, 16)
    assert k[:, :, -1].abs().sum() == 0 and v.float().shape == k.shape


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    from spectralkv import fused

    cpu = torch.device("cpu")
    assert not fused.use_triton("auto", cpu) and not fused.use_triton("torch", cpu)
    assert fused.use_triton("triton", cpu)  # TRITON_INTERPRET=1 here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused.use_triton("triton", cpu)
    monkeypatch.setenv("SPECTRALKV_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SPECTRALKV_BACKEND"):
        fused.default_backend()
    # CUDA without a usable Triton: reference, with one warning
    monkeypatch.setattr(fused, "_TRITON_STATE", {"modules": None, "error": ImportError("no triton")})
    with pytest.warns(RuntimeWarning, match="falls back"):
        assert not fused.use_triton("auto", torch.device("cuda"))


# -- position-centred keys (RoPE-aware calibrations) --------------------------------------------------------------
def positioned_case(g: int, d: int, mix_k: str, n: int, window: int, first: list[int], *, hkv: int = 2,
                    seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """:func:`make_case` whose keys carry a pre-RoPE mean rotated to each token's position, encoded by a
    position-centred quantizer; row ``b``'s first compressed token sits at position ``first[b]``."""
    from spectralkv.positions import position_features, rotate

    case = make_case(g, d, mix_k, "3bit", n, window, b=len(first), hkv=hkv, seed=seed, **kwargs)
    gen = torch.Generator().manual_seed(seed + 7)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    m = 3 * torch.randn(hkv, d, generator=gen)
    qk = make_quantizer(hkv, d, mix_k, kwargs.get("k_scale", True), seed=seed, position_mean=m,
                        frequencies=torch.cat([inv, inv]))
    start = torch.tensor(first)[:, None]
    positions = start + torch.arange(n)
    cos, sin = position_features(positions, qk.frequencies)
    rotating = rotate(m[None, :, None, :], cos[:, None], sin[:, None]).to(DEV)
    keys = make_tokens(qk, len(first), n, seed=seed + 2) + rotating
    kc, ks, ko = qk.encode_with_outliers(keys, positions=positions.to(DEV))
    return {**case, "k": PackedSide(qk, kc, ks, ko, start.to(DEV))}


def test_reference_with_positioned_keys_equals_sdpa_over_decode() -> None:
    case = positioned_case(3, 64, "2.5bit", 37, 5, [4, 1000], masks="ragged")
    got = decode_attention_ref(**case)
    torch.testing.assert_close(got, sdpa_over_decoded(case), atol=1e-5, rtol=1e-5)
    k = case["k"]
    shifted = {**case, "k": PackedSide(k.quantizer, k.codes, k.scales, k.outliers, k.positions + 17)}
    assert (decode_attention_ref(**shifted) - got).abs().max() > 1e-3  # the position term matters
    with pytest.raises(ValueError, match="needs `positions`"):
        decode_attention_ref(**{**case, "k": PackedSide(k.quantizer, k.codes, k.scales, k.outliers)})


def test_rows_sharing_positions_take_one_centre_per_position() -> None:
    """Keys whose rows share their positions (no left padding) give the same attention when the side says so (one
    cos/sin per position instead of per row), in the reference and the kernel, and when decoded."""
    from spectralkv.kernels.decode_attention import decode_attention

    case = positioned_case(2, 64, "2.5bit", 21, 3, [9, 9], masks="ragged")
    k = case["k"]
    shared = {**case, "k": PackedSide(k.quantizer, k.codes, k.scales, k.outliers, k.positions, True)}
    assert shared["k"].token_positions().shape == (1, 21)
    expected = decode_attention_ref(**case)
    torch.testing.assert_close(decode_attention_ref(**shared), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(decode_attention(**shared, num_splits=2, block_t=16), expected, atol=1e-5, rtol=1e-5)
    decoded = k.quantizer.decode(k.codes, k.scales, torch.float32, k.outliers, positions=k.token_positions())
    assert torch.equal(k.quantizer.decode(k.codes, k.scales, torch.float32, k.outliers,
                                          positions=shared["k"].token_positions()), decoded)


POSITIONED_CASES = [  # (g, d, mix_k, n, window, first, splits, block_t, dtype)
    (3, 64, "2.5bit", 45, 4, [4, 37], 3, 16, torch.float32),
    (4, 80, "all-widths", 30, 2, [100_000, 5], 2, 16, torch.float32),  # far positions: angles reduced in fp64
    (1, 64, "4bit", 20, 3, [6, 6], 1, 32, torch.bfloat16),
]


@pytest.mark.parametrize("g,d,mix_k,n,window,first,splits,block_t,dtype", POSITIONED_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_decode_attention_kernel_with_positioned_keys(g: int, d: int, mix_k: str, n: int, window: int,
                                                      first: list[int], splits: int, block_t: int,
                                                      dtype: torch.dtype) -> None:
    from spectralkv.kernels.decode_attention import decode_attention

    case = positioned_case(g, d, mix_k, n, window, first, dtype=dtype, seed=g + d)
    out = decode_attention(**case, num_splits=splits, block_t=block_t)
    exact = decode_attention_ref(**{**case, "q": case["q"].float(), "k_fp": case["k_fp"].float(),
                                    "v_fp": case["v_fp"].float()})
    same_dtype_err = (decode_attention_ref(**case).float() - exact).abs().max().item()
    assert (out.float() - exact).abs().max().item() <= 2 * same_dtype_err + ABS_FLOOR
