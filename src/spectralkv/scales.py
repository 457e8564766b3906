"""Per-token scale formats: how the ``rms(z)`` a token's codes are divided by is stored.

``fp16`` stores the scale itself (16 bits per token and KV head). ``log8`` stores one byte: the index of the nearest
of 256 log-spaced levels over a range the calibration measured for the layer and K/V (``[lo, hi]`` in log2, with a
margin; beyond it the scale clamps). At head_dim 64 an fp16 scale costs 0.25 bits per coordinate, an eighth of a
2-bit budget; the byte costs half that, and its rounding (a relative error of at most half a level, about 1% for a
range of 6 octaves) is far below what the codes lose. The bits it frees go to the codes: see docs/experiments.md.

A log8 code is found without logarithms, by counting the 255 level boundaries (on the mean square, so no square
root either) below the token's mean square; a Triton kernel does the same with the same float32 boundaries, so the
two agree exactly given the same mean square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SCALE_FORMATS = ("fp16", "log8")
LOG8_LEVELS = 256
LOG8_BITS = 8
SCALE_FLOOR = 1e-6  # smallest fp16 scale: a token of all-zero coordinates must not divide by zero
RANGE_MARGIN = 1.0  # octaves added on each side of the range the calibration saw


def check_scale_format(name: str) -> str:
    if name not in SCALE_FORMATS:
        raise ValueError(f"scale format must be one of {SCALE_FORMATS}, got {name!r}.")
    return name


def measured_range(rms: torch.Tensor, margin: float = RANGE_MARGIN) -> torch.Tensor:
    """``[lo, hi]`` (log2, float32) covering the token scales ``rms`` (any shape) plus ``margin`` octaves each side:
    what a calibration stores for a layer and K/V."""
    logs = rms.float().clamp_min(SCALE_FLOOR).log2()
    lo, hi = float(logs.min()) - margin, float(logs.max()) + margin
    if not hi > lo:  # a single distinct scale: any non-empty range will do
        hi = lo + 1.0
    return torch.tensor([lo, hi], dtype=torch.float32)


@dataclass(frozen=True)
class ScaleCodec:
    """One layer-and-K/V's scale format; ``log_range`` ``(lo, hi)`` in log2 with ``log8``."""

    format: str = "fp16"
    log_range: tuple[float, float] | None = None
    _tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_scale_format(self.format)
        if self.format == "log8":
            if self.log_range is None or len(self.log_range) != 2:
                raise ValueError(f"a log8 scale needs its calibrated log2 range (lo, hi), got {self.log_range!r}.")
            lo, hi = (float(x) for x in self.log_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                raise ValueError(f"a log8 scale range must be finite with lo < hi, got {self.log_range!r}.")
            object.__setattr__(self, "log_range", (lo, hi))
        elif self.log_range is not None:
            raise ValueError("an fp16 scale takes no range.")

    @property
    def bits(self) -> int:
        return 16 if self.format == "fp16" else LOG8_BITS

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.format == "fp16" else torch.uint8

    def tables(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(boundaries ``[256]`` on the mean square, +inf padded; levels ``[256]``), float32 on ``device`` (log8)."""
        device = torch.device(device)
        if device not in self._tables:
            assert self.log_range is not None
            lo, hi = self.log_range
            step = (hi - lo) / (LOG8_LEVELS - 1)
            i = torch.arange(LOG8_LEVELS, dtype=torch.float64)
            levels = torch.exp2(lo + i * step)
            bounds = torch.exp2(2 * (lo + (i + 0.5) * step))  # between level i and i + 1, squared
            bounds[-1] = math.inf
            self._tables[device] = (bounds.float().to(device), levels.float().to(device))
        return self._tables[device]

    def encode_mean_square(self, ms: torch.Tensor) -> torch.Tensor:
        """Mean squares ``ms`` of tokens' coordinates -> stored scales (``dtype``)."""
        if self.format == "fp16":
            return ms.sqrt().clamp_min(SCALE_FLOOR).to(torch.float16)
        bounds, _ = self.tables(ms.device)
        return torch.searchsorted(bounds, ms.float().contiguous()).clamp_max(LOG8_LEVELS - 1).to(torch.uint8)

    def values(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored scales -> the float32 scales they stand for."""
        return stored_values(stored, None if self.format == "fp16" else self.tables(stored.device)[1])

    def quantized(self, ms: torch.Tensor) -> torch.Tensor:
        """The float32 scale a token of mean square ``ms`` is divided by (encode, then decode)."""
        return self.values(self.encode_mean_square(ms))


def stored_values(stored: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
    """Stored scales -> float32 values: fp16 scales as they are, log8 levels looked up in ``levels`` ``[256]``
    (None for fp16). The one rule both the quantizer and the kernels' tables decode scales by."""
    return stored.float() if levels is None else levels[stored.long()]


FP16 = ScaleCodec()
