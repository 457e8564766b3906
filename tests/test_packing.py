"""Bit packing: the LSB-first byte layout the Triton kernels share, round trips for every width, and the row layout
of arbitrary bit mixes through :class:`SpectralQuantizer`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectralkv import codebook as cb
from spectralkv.packing import pack, packed_bytes, unpack
from spectralkv.quantizer import SpectralQuantizer


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [8, 24, 64])
def test_round_trip_every_width(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 2**bits, (2, 3, n), generator=g)
    codes[0, 0] = 2**bits - 1  # all ones: every bit of every byte set
    codes[0, 1] = 0
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, n * bits // 8)
    out = unpack(packed, bits, n)
    assert out.dtype == torch.int64
    assert torch.equal(out, codes)
    if bits < 8:  # a full row of all-ones codes packs to 0xFF bytes
        assert (packed[0, 0] == 255).all() and (packed[0, 1] == 0).all()


def test_layout_lsb_first_three_bits_by_hand() -> None:
    """Code j occupies stream bits 3j..3j+2; stream bit i is bit i % 8 of byte i // 8.

    The stream is the little-endian integer sum(code_j << 3j) = 5 + 3<<3 + 7<<6 + 1<<12 + 6<<15 + 2<<18 + 4<<21
    = 9114077 = 0x8B11DD, i.e. bytes 0xDD, 0x11, 0x8B."""
    codes = torch.tensor([5, 3, 7, 0, 1, 6, 2, 4])
    assert pack(codes, 3).tolist() == [0xDD, 0x11, 0x8B]
    assert unpack(torch.tensor([0xDD, 0x11, 0x8B], dtype=torch.uint8), 3, 8).tolist() == codes.tolist()


@pytest.mark.parametrize(
    ("codes", "bits", "expected"),
    [
        ([1, 0, 0, 0, 0, 0, 0, 1], 1, [0b10000001]),  # first code is the least significant bit
        ([0xA, 0x3], 4, [0x3A]),  # first nibble is the low nibble
        ([1, 2, 3, 0], 2, [0b00111001]),
        ([200, 7], 8, [200, 7]),
    ],
)
def test_layout_small_examples(codes: list[int], bits: int, expected: list[int]) -> None:
    assert pack(torch.tensor(codes), bits).tolist() == expected


def test_unaligned_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="do not fill whole bytes"):
        pack(torch.zeros(3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="expected 3 packed bytes"):
        unpack(torch.zeros(4, dtype=torch.uint8), 3, 8)
    assert packed_bytes(16, 5) == 10


# -- arbitrary bit mixes through the quantizer's row layout ---------------------------------------------------------
_TABLE = cb.fit_codebooks(torch.randn(4096, generator=torch.Generator().manual_seed(0)))


@st.composite
def quantizer_cases(draw: st.DrawFn) -> tuple[SpectralQuantizer, torch.Tensor]:
    h = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 4))
    d = 8 * groups
    widths = draw(st.lists(st.lists(st.integers(0, 8), min_size=groups, max_size=groups), min_size=h, max_size=h))
    seed = draw(st.integers(0, 2**31 - 1))
    token_scale = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    bits = torch.tensor(widths, dtype=torch.uint8).repeat_interleave(8, dim=1)  # [H, D], 8 per group
    bits = torch.stack([row[torch.randperm(d, generator=g)] for row in bits])  # scattered over coordinates
    basis = torch.linalg.qr(torch.randn(h, d, d, generator=g, dtype=torch.float64))[0].float()
    lam = torch.rand(h, d, generator=g).sort(-1, descending=True).values + 0.1
    mean = torch.randn(h, d, generator=g)
    q = SpectralQuantizer(mean, basis, lam, _TABLE, bits, token_scale)
    x = mean[None, :, None] + torch.randn(2, h, draw(st.integers(1, 5)), d, generator=g) * lam.sqrt()[None, :, None]
    return q, x


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(quantizer_cases())
def test_row_layout_for_arbitrary_bit_mixes(case: tuple[SpectralQuantizer, torch.Tensor]) -> None:
    """Each coordinate decodes to the nearest centroid of its own bit width (0 bits: the mean), whatever the mix,
    and the row is exactly the regimes packed one after another, widest first, head after head."""
    q, x = case
    packed, scales = q.encode(x)
    assert packed.shape == (x.shape[0], x.shape[2], q.row_bytes)
    assert q.row_bytes * 8 == q.code_bits_per_token == int(q.bits.long().sum())
    z = q.rotate(x)  # packing order
    if q.token_scale:
        assert scales is not None and scales.shape == (x.shape[0], x.shape[2], q.num_heads)
        s = scales.transpose(1, 2).float().unsqueeze(-1)
        z = z / s
    else:
        assert scales is None
    expected = torch.zeros_like(z)
    row = []
    for h in range(q.num_heads):
        widths = q.bits[h].long()[q.perm[h]]  # bits in packing order: non-increasing
        assert (widths[1:] <= widths[:-1]).all()
        assert [r.bits for r in q.regimes[h]] == sorted({int(b) for b in widths if b > 0}, reverse=True)
        for b in sorted({int(w) for w in widths if w > 0}, reverse=True):
            cols = (widths == b).nonzero().flatten()
            codes = cb.quantize(z[:, h, :, cols], _TABLE, b)
            expected[:, h, :, cols] = cb.centroids(_TABLE, b)[codes]
            row.append(pack(codes, b))
    if q.token_scale:
        expected = expected * s
    got = q.decode_rotated(packed, scales)
    assert torch.equal(got, expected)
    reference_row = torch.cat(row, -1) if row else packed[..., :0]
    assert torch.equal(packed, reference_row)


def test_row_decoder_edge_shapes() -> None:
    """The byte-lookup decoder handles no tokens, and a layer whose coordinates all got 0 bits (empty rows)."""
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(2, 16, 16, generator=g))[0]
    for widths in ([[3] * 16, [5] * 8 + [2] * 8], [[0] * 16, [0] * 16]):
        q = SpectralQuantizer(torch.zeros(2, 16), basis, torch.ones(2, 16), _TABLE, torch.tensor(widths), True)
        empty = q.decode_rotated(torch.zeros(3, 0, q.row_bytes, dtype=torch.uint8), torch.ones(3, 0, 2))
        assert empty.shape == (3, 2, 0, 16)
        x = torch.randn(3, 2, 4, 16, generator=g)
        z = q.decode_rotated(*q.encode(x))
        assert z.shape == (3, 2, 4, 16) and bool(z.isfinite().all())
        assert (z == 0).all() == (q.row_bytes == 0)
