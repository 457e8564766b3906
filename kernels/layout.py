"""Per-coordinate lookup tables that let one kernel read and write any regime layout (pure PyTorch, no Triton).

A :class:`~spectralkv.quantizer.SpectralQuantizer` packs each KV head's row slice as regimes (contiguous runs of
coordinates with one bit width, LSB-first bit streams, byte-aligned; see :mod:`spectralkv.packing`). The regimes
differ from head to head, so a kernel program, which handles one KV head, cannot specialise on them at compile
time. Instead every coordinate ``e`` (packing order) of head ``h`` gets:

* ``nbits[h, e]``: its bit width (0 = not stored, decodes to the mean);
* ``byte_index[h, e]``: the row byte holding its first bit (absolute within the row: head offset included);
* ``shift[h, e]``: the position of that bit within the byte.

A code is ``((row[i] | row[i + 1] << 8) >> shift) & (2**nbits - 1)`` with ``i = byte_index``; the second byte is only
read when ``shift + nbits > 8`` (so never past the end of the row). This is the regime layout flattened: it decodes
exactly what :func:`spectralkv.packing.unpack` decodes.

Codebooks become two ``[9, 256]`` tables indexed by ``nbits * 256 + code``: ``centroids`` (row 0 all zeros, so a
0-bit coordinate reconstructs to 0 in the rotated basis, i.e. to the mean) and ``boundaries`` (row ``b``: the
``2**b - 1`` decision boundaries of the ``b``-bit codebook, computed exactly as :func:`spectralkv.codebook.quantize`
computes them, padded with ``+inf``).

The PyTorch path decodes whole rows by byte lookups instead (``rows``, :mod:`spectralkv.row_decoder`): same numbers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from spectralkv import codebook as cb
from spectralkv.quantizer import SpectralQuantizer
from spectralkv.row_decoder import RowDecoder
from spectralkv.scales import stored_values

TABLE_ROWS = cb.MAX_BITS + 1
TABLE_COLS = cb.CODEBOOK_SIZE


@dataclass(frozen=True)
class SpectralTables:
    """Everything a kernel needs about one quantizer, as tensors on one device (see the module docstring)."""

    num_heads: int
    head_dim: int
    row_bytes: int
    max_head_bytes: int
    token_scale: bool
    nbits: torch.Tensor  # [H, D] int32
    byte_index: torch.Tensor  # [H, D] int32, absolute in the row
    shift: torch.Tensor  # [H, D] int32
    head_offset: torch.Tensor  # [H] int32
    head_bytes: torch.Tensor  # [H] int32
    centroids: torch.Tensor  # [9, 256] float32, row 0 zeros
    boundaries: torch.Tensor  # [9, 256] float32, +inf padded
    mean: torch.Tensor  # [H, D] float32
    encoder: torch.Tensor  # [H, D, D] float32: z = (x - mean) @ encoder[h]
    decoder: torch.Tensor  # [H, D, D] float32: x = mean + z @ decoder[h]
    decoder_mean: torch.Tensor  # [H, D + 1, D] float32: decoder rows, then the mean (q @ it.T = [q_rot, q . mean])
    rows: RowDecoder  # the PyTorch path's byte-lookup decoder of packed rows
    position_mean: torch.Tensor | None = None  # [H, D] float32 pre-RoPE mean m (position-centred keys only)
    frequencies: torch.Tensor | None = None  # [D] float32 RoPE frequencies (with position_mean)
    scale_tables: torch.Tensor | None = None  # [2, 256] float32 log8 scale boundaries and levels (None: fp16 scales)

    @property
    def scale_levels(self) -> torch.Tensor | None:
        """``[256]`` float32 values of a log8 scale's levels (None for fp16 scales)."""
        return None if self.scale_tables is None else self.scale_tables[1]

    def scale_values(self, stored: torch.Tensor | None) -> torch.Tensor | None:
        """Stored scales -> float32 values (None stays None)."""
        return None if stored is None else stored_values(stored, self.scale_levels)


def build_tables(q: SpectralQuantizer, device: torch.device | str = "cpu") -> SpectralTables:
    """Build the lookup tables of ``q`` on ``device`` (use :func:`tables_for` to reuse them): the quantizer's own
    per-coordinate tables (:meth:`SpectralQuantizer.coordinate_tables`), shaped per head for the kernels."""
    h, d = q.num_heads, q.head_dim
    coords = q.coordinate_tables("cpu")
    head_bytes = torch.tensor([sum(r.nbytes for r in regs) for regs in q.regimes], dtype=torch.int32)
    boundaries = torch.full((TABLE_ROWS, TABLE_COLS), float("inf"), dtype=torch.float32)
    for b in range(1, TABLE_ROWS):
        bnd = cb.boundaries(q.codebooks.float(), b)
        boundaries[b, : bnd.numel()] = bnd
    dev = torch.device(device)
    return SpectralTables(
        num_heads=h,
        head_dim=d,
        row_bytes=q.row_bytes,
        max_head_bytes=int(head_bytes.max()) if h else 0,
        token_scale=q.token_scale,
        nbits=coords.nbits.view(h, d).to(dev, torch.int32),
        byte_index=coords.byte.view(h, d).to(dev, torch.int32),
        shift=coords.shift.view(h, d).to(dev),
        head_offset=torch.tensor(q.head_byte_offsets, dtype=torch.int32, device=dev),
        head_bytes=head_bytes.to(dev),
        centroids=coords.centroids.view(TABLE_ROWS, TABLE_COLS).to(dev),
        boundaries=boundaries.to(dev),
        mean=q.mean.float().contiguous().to(dev),
        encoder=q.encoder.float().contiguous().to(dev),
        decoder=q.decoder.float().contiguous().to(dev),
        decoder_mean=torch.cat([q.decoder.float(), q.mean.float()[:, None, :]], dim=1).contiguous().to(dev),
        rows=q.row_decoder(dev),
        position_mean=None if q.position_mean is None else q.position_mean.float().contiguous().to(dev),
        frequencies=None if q.frequencies is None else q.frequencies.float().contiguous().to(dev),
        scale_tables=(torch.stack(q.scale_codec.tables(dev)).contiguous()
                      if q.token_scale and q.scale_codec.format == "log8" else None),
    )


_TABLES: weakref.WeakKeyDictionary[SpectralQuantizer, dict[torch.device, SpectralTables]] = (
    weakref.WeakKeyDictionary()
)


def tables_for(q: SpectralQuantizer, device: torch.device | str) -> SpectralTables:
    """The tables of ``q`` on ``device``, built once and kept as long as the quantizer lives."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    per_device = _TABLES.setdefault(q, {})
    if dev not in per_device:
        per_device[dev] = build_tables(q, dev)
    return per_device[dev]
