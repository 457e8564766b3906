"""A static-shape compressed cache, for decode steps under ``torch.compile`` and CUDA graphs.

Usage::

    from spectralkv.fused import enable_fused
    from spectralkv.static import StaticSpectralKVCache

    enable_fused(model)
    cache = StaticSpectralKVCache(model, calibration, max_cache_len=prompt_len + max_new_tokens)
    model.generate(**inputs, cache=cache, max_new_tokens=...)  # on CUDA, generate compiles the decode step

Why a second cache. :class:`~spectralkv.fused.FusedSpectralKVCache` grows its buffers and hands the kernel views
whose lengths are Python ints, so every step has new shapes: it cannot be captured, and on a GPU a decode step of a
small model is bound by the host launching ~200 operations. Here every buffer is allocated once, at its final size,
and updated in place; how many tokens it holds is a tensor (like transformers' ``StaticLayer``), so every decode
step runs the same operations on the same addresses.

Layout of one layer, with ``S`` sink tokens, a window of ``W`` and ``R = W + 1`` ring slots:

* ``fp_keys``/``fp_values`` ``[B, H, S + R, D]`` (model dtype): slots ``0..S-1`` hold the sinks, the other ``R`` a
  ring of the most recent tokens; position ``p >= S`` lives in slot ``S + (p - S) % R``.
* code rows ``[B, max_cache_len - S + 1, row_bytes]`` (and scales): position ``p >= S`` is row ``p - S``;
  the last row is scratch, written by steps that have nothing to compress yet.
* with a calibration that keeps exact outliers, per row a count and ``C`` fixed slots (index and fp16 value,
  :class:`~spectralkv.quantizer.SlotOutliers`): a token keeps its ``C`` largest outliers. Static buffers pay for
  every slot, so ``C`` defaults to the calibration's average count per token rounded up
  (:func:`default_outlier_slots`: 1 for SmolLM2's default calibration, cap 3), which measured best for
  the memory it takes (``scripts/eval_outlier_slots.py``, docs/experiments.md); ``outlier_slots=`` chooses another
  count, and at the calibration's cap the cache keeps exactly what the growing caches keep.

A decode step at position ``p``: the token at ``p - R`` (whose ring slot the new token takes) is encoded into its row,
the new token is written into slot ``p``, and attention reads rows ``[0, p - W - S)`` plus the sinks and the ring,
through ``comp_lengths`` and a slot mask (tensors). Those are the same tokens, compressed the same way, as
:class:`FusedSpectralKVCache` with ``flush_block=1`` holds, so the two give the same numbers (the tests check it).

The prefill runs eagerly (its length is a shape anyway): it attends to its own full-precision tokens with SDPA and
fills the buffers. Decode steps ignore transformers' mask (they know which slots hold tokens), so what this cache
does not do, it refuses: padded batches (use :class:`FusedSpectralKVCache`), multi-token steps after the prefill,
and calibrations that leave a full-attention layer uncompressed (its mask would have another length).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import STATIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, get_layer_types_and_kwargs

from .cache import _model_config, left_padding
from .config import SpectralKVConfig
from .fused import (
    BACKENDS,
    FUSED_ATTENTION,
    StaticDecodeView,
    _kernels,
    default_backend,
    require_per_head_bases,
    use_triton,
)
from .layer_base import FLUSH_CHUNK
from .quantizer import SlotOutliers, SpectralQuantizer, slot_starts


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_slots(outlier_slots: int | None) -> None:
    if outlier_slots is not None and (isinstance(outlier_slots, bool) or not isinstance(outlier_slots, int)
                                      or outlier_slots < 1):
        raise ValueError(f"outlier_slots must be an integer >= 1, or None for the default (the calibration's average "
                         f"outlier count per token, rounded up), got {outlier_slots!r}.")


def default_outlier_slots(calibration: SpectralKVConfig) -> int | None:
    """Slots per token the static cache gives a calibration's exact outliers by default: their average count per
    token (layer and side) rounded up, at most the cap; None when it keeps none.

    Why not the cap (which keeps what the growing caches keep): static buffers pay for every slot whether used or
    not. On SmolLM2-135M (a mean-centred calibration: 0.57% outliers, 1.09 per token, cap 5) 1 or 2 slots gave
    the lowest perplexity for the bits stored at every budget from 2 to 4, and the cap was worse at 2-3 bits (at a
    static 2.49 bits per coordinate: +3.28% with 1 slot, +5.41% with 5); measured with
    ``scripts/eval_outlier_slots.py`` (docs/results/outlier_slots)."""
    if calibration.outlier_threshold is None:
        return None
    mean = calibration.outlier_fraction * calibration.num_kv_heads * calibration.head_dim
    slots = max(1, math.ceil(mean - 1e-9))
    cap = calibration.outlier_cap
    return slots if cap is None else min(slots, cap)


def _slots(q: SpectralQuantizer, outlier_slots: int | None) -> int:
    """Exact-outlier slots per token for ``q`` (0 when it keeps none)."""
    if q.outlier_threshold is None:
        return 0
    cap = outlier_slots if outlier_slots is not None else q.outlier_cap
    return q.coords if cap is None else min(int(cap), q.coords)


class StaticCompressedLayer(CacheLayerMixin):
    """One compressed full-attention layer with preallocated buffers (see the module docstring)."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, quantizer_k: SpectralQuantizer, quantizer_v: SpectralQuantizer, sink_tokens: int, window: int,
                 max_cache_len: int, backend: str = "auto", outlier_slots: int | None = None,
                 shared: dict[Any, torch.Tensor] | None = None) -> None:
        super().__init__()
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be an integer >= 1 (prompt + new tokens), got {max_cache_len!r}.")
        _check_slots(outlier_slots)
        self.quantizers = (quantizer_k, quantizer_v)
        # exact-outlier slots per token and side (0: the quantizer keeps none)
        self.slots = tuple(_slots(q, outlier_slots) for q in self.quantizers)
        self._shared = {} if shared is None else shared  # slot offsets, one tensor for all layers of a cache
        self.sink_tokens, self.window, self.max_cache_len = int(sink_tokens), int(window), max_cache_len
        self.ring = self.window + 1
        self.rows = max(0, max_cache_len - self.sink_tokens)  # code rows (plus one scratch row)
        self.backend = backend
        self.cumulative_length = torch.tensor(0, dtype=torch.long)  # a tensor: compiled steps must not specialise on it
        self.prefilled = False
        self._eager_length = 0  # tokens seen by eager (uncompiled) calls, for a clear error on overflow

    # -- buffers -----------------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        from .kernels.layout import tables_for

        b, h, _, d = key_states.shape
        dev = key_states.device
        self.dtype, self.device = key_states.dtype, dev
        slots = self.sink_tokens + self.ring
        self.keys = key_states.new_zeros(b, h, slots, d)  # ``keys``/``values`` as transformers' layers name them
        self.values = value_states.new_zeros(b, h, slots, value_states.shape[-1])
        self.codes, self.scales = [], []
        self.out_counts: list[torch.Tensor | None] = []
        self.out_index: list[torch.Tensor | None] = []
        self.out_values: list[torch.Tensor | None] = []
        self.out_starts: list[torch.Tensor | None] = []  # flat slot offsets (shared by layers with the same shape)
        for q, c in zip(self.quantizers, self.slots, strict=True):
            self.codes.append(torch.zeros(b, self.rows + 1, q.row_bytes, dtype=torch.uint8, device=dev))
            self.scales.append(torch.zeros(b, self.rows + 1, h, dtype=q.scale_dtype, device=dev)
                               if q.token_scale else None)
            n = self.rows + 1
            self.out_counts.append(torch.zeros(b, n, dtype=q.outlier_count_dtype, device=dev) if c else None)
            self.out_index.append(torch.zeros(b, n, c, dtype=q.outlier_index_dtype, device=dev) if c else None)
            self.out_values.append(torch.zeros(b, n, c, dtype=torch.float16, device=dev) if c else None)
            key = (b, self.rows, c, str(dev))
            if c and key not in self._shared:
                self._shared[key] = slot_starts(b, self.rows, (self.rows + 1) * c, c, dev)
            self.out_starts.append(self._shared[key] if c else None)
        self.cumulative_length = self.cumulative_length.to(dev)
        self._slot_index = torch.arange(slots, device=dev)
        self.triton = use_triton(self.backend, dev)
        self.num_splits = 1  # kernel splits per sequence and head, fixed here (a compiled step must not look it up)
        if self.triton:
            self.num_splits = _kernels()[0].default_num_splits(b, h, max(1, self.rows), 32, dev)
        self.tables = tuple(tables_for(q, dev) for q in self.quantizers)
        # code row r holds position sinks + r (no padded batches here): what position-centred keys are centred on
        self.first_position = torch.full((b, 1), self.sink_tokens, dtype=torch.long, device=dev)
        if not _is_compiling():  # fixed addresses: no recompilation or CUDA-graph skip when updated in place
            for t in (self.keys, self.values, self.cumulative_length, *self._row_buffers(), *self.out_starts):
                if t is not None:
                    torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def _slot(self, pos: torch.Tensor) -> torch.Tensor:
        s = self.sink_tokens
        return torch.where(pos < s, pos, s + (pos - s).remainder(self.ring))

    def _row(self, pos: torch.Tensor) -> torch.Tensor:
        """Code row of position ``pos``; the scratch row for sinks, negative positions and overflow."""
        rel = pos - self.sink_tokens
        return torch.where((rel >= 0) & (rel < self.rows), rel, self.rows)

    def _row_buffers(self) -> list[torch.Tensor]:
        """Every buffer with one entry per code row (what a write fills and beam search reorders)."""
        return [t for t in (*self.codes, *self.scales, *self.out_counts, *self.out_index, *self.out_values)
                if t is not None]

    def _encode(self, side: int, x: torch.Tensor, positions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, SlotOutliers | None]:
        q, c = self.quantizers[side], self.slots[side]
        if self.triton:
            term = q.position_term(positions, x.device, x.shape[0], x.shape[2])
            if term is not None:  # the kernel subtracts the mean; the per-position part goes first (float32)
                x = x.float() - term
            if c:
                return _kernels()[1].spectral_encode_with_outliers(q, x, slots=c, tables=self.tables[side])
            return (*_kernels()[1].encode_launch(self.tables[side], x), None)
        if c:
            return q.encode_with_outliers(x, slots=c, positions=positions)
        return (*q.encode(x, positions=positions), None)

    def _write_rows(self, side: int, x: torch.Tensor, rows: torch.Tensor | slice) -> None:
        positions = None
        if self.quantizers[side].position_centred:  # row r is position sinks + r (the scratch row: any)
            r = torch.arange(rows.start, rows.stop, device=x.device) if isinstance(rows, slice) else rows
            positions = (r + self.sink_tokens).reshape(1, -1)
        packed, scales, outliers = self._encode(side, x, positions)
        parts = [(self.codes[side], packed), (self.scales[side], scales)]
        if outliers is not None:
            parts += [(self.out_counts[side], outliers.counts), (self.out_index[side], outliers.index),
                      (self.out_values[side], outliers.values)]
        for buffer, new in parts:
            if buffer is None or new is None:
                continue
            if isinstance(rows, slice):
                buffer[:, rows] = new
            else:
                buffer.index_copy_(1, rows, new)

    # -- update ------------------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        if not self.prefilled:
            return self._prefill(key_states, value_states)
        if n != 1:
            raise NotImplementedError(
                f"StaticSpectralKVCache takes one prefill, then one token per step; got a {n}-token step after the "
                "prefill. Use FusedSpectralKVCache for chunked prefill.")
        return self._decode_step(key_states, value_states)

    def _check_room(self, n: int) -> None:
        if _is_compiling():
            return
        if self._eager_length + n > self.max_cache_len:
            raise ValueError(
                f"StaticSpectralKVCache was made for max_cache_len={self.max_cache_len} tokens and this step would "
                f"hold {self._eager_length + n}. Make the cache with max_cache_len >= prompt length + max_new_tokens.")
        self._eager_length += n

    def _prefill(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the buffers from the prompt (eager: its length is a shape) and attend to it in full precision."""
        if _is_compiling():
            raise RuntimeError("The prefill of StaticSpectralKVCache runs eagerly; compile only the decode steps "
                               "(generate does so).")
        n = k.shape[2]
        self._check_room(n)
        s, r = self.sink_tokens, self.ring
        ns = min(s, n)
        self.keys[:, :, :ns], self.values[:, :, :ns] = k[:, :, :ns], v[:, :, :ns]
        lo = max(s, n - r)  # the last R tokens go to the ring (one of them is compressed at the first step)
        if lo < n:
            slots = self._slot(torch.arange(lo, n, device=k.device))
            self.keys.index_copy_(2, slots, k[:, :, lo:n])
            self.values.index_copy_(2, slots, v[:, :, lo:n])
        for start in range(s, n - r, FLUSH_CHUNK):  # the older ones are compressed now
            stop = min(n - r, start + FLUSH_CHUNK)
            for side, x in enumerate((k, v)):
                self._write_rows(side, x[:, :, start:stop], slice(start - s, stop - s))
        self.cumulative_length.fill_(n)
        self.prefilled = True
        return k, v

    def _decode_step(self, k: torch.Tensor, v: torch.Tensor) -> tuple[StaticDecodeView, StaticDecodeView]:
        self._check_room(1)
        p = self.cumulative_length.clone()  # the position of the new token (the counter itself moves on below)
        if _is_compiling():  # no Python error inside a graph; a device-side assert instead of silent corruption
            torch._assert_async(p < self.max_cache_len, "StaticSpectralKVCache: max_cache_len exceeded")
        # the token whose ring slot the new one takes leaves full precision, exactly as in the dynamic cache
        leaving = p - self.ring
        slot_out = self._slot(leaving.clamp_min(0)).reshape(1)
        row_out = self._row(leaving).reshape(1)
        for side, fp in enumerate((self.keys, self.values)):
            self._write_rows(side, fp.index_select(2, slot_out), row_out)
        slot_in = self._slot(p).reshape(1)
        self.keys.index_copy_(2, slot_in, k)
        self.values.index_copy_(2, slot_in, v)
        self.cumulative_length.add_(1)
        length = p + 1
        b = k.shape[0]
        in_use = (length - self.ring - self.sink_tokens).clamp(0, self.rows)
        view = StaticDecodeView(
            keys=self._packed(0),
            values=self._packed(1),
            k_fp=self.keys,
            v_fp=self.values,
            comp_lengths=in_use.reshape(1).expand(b),
            fp_mask=(self._slot_index < length).unsqueeze(0).expand(b, -1),
            length=length,
            tables=self.tables,
            triton=self.triton,
            num_splits=self.num_splits,
        )
        return view, view

    def _packed(self, side: int) -> Any:
        from .kernels.ref import PackedSide

        scales, n = self.scales[side], self.rows
        outliers = None
        if self.slots[side]:
            outliers = SlotOutliers(self.out_counts[side][:, :n], self.out_index[side][:, :n],
                                    self.out_values[side][:, :n], self.out_starts[side])
        q = self.quantizers[side]
        return PackedSide(q, self.codes[side][:, :n], None if scales is None else scales[:, :n], outliers,
                          self.first_position if q.position_centred else None)

    # -- what transformers asks ------------------------------------------------------------------------------------
    def get_seq_length(self) -> Any:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the prefill attends to its own tokens; decode steps do not read the mask, so any fixed size does
        return (query_length, 0) if not self.prefilled else (self.max_cache_len, 0)

    def reset(self) -> None:
        """Empty the cache in place (same buffers, so a compiled step stays valid)."""
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.cumulative_length.zero_()
        else:
            self.cumulative_length = torch.tensor(0, dtype=torch.long)
        self.prefilled = False
        self._eager_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder rows in place (the buffers keep their addresses)."""
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        for t in (self.keys, self.values, *self._row_buffers()):
            t.copy_(t.index_select(0, idx))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "A compressed KV cache cannot be cropped back to full precision, so assisted/speculative decoding is not "
            "supported with spectralkv.")

    def memory(self) -> dict[str, int]:
        """Allocated bytes by part (static: the whole capacity, whatever is in use)."""
        if not self.is_initialized:
            return {"codes": 0, "metadata": 0, "outliers": 0, "fp_slots": 0}

        def nb(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        return {"codes": sum(map(nb, self.codes)), "metadata": sum(map(nb, self.scales)),
                "outliers": sum(map(nb, (*self.out_counts, *self.out_index, *self.out_values))),
                "fp_slots": nb(self.keys) + nb(self.values)}


class StaticSpectralKVCache(Cache):
    """A transformers ``Cache`` of fixed size for compiled decoding (see the module docstring).

    Args:
        model: the model (or its config); checked against the calibration. Its attention implementation must be
            ``"spectralkv_fused"`` (:func:`spectralkv.fused.enable_fused`).
        calibration: a :class:`SpectralKVConfig` (or a path / Hub id).
        max_cache_len: tokens the cache can hold (prompt + new tokens).
        bits, window, sink_tokens: as for :class:`~spectralkv.cache.SpectralKVCache`.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`spectralkv.fused`).
        outlier_slots: exact outliers kept per token, layer and side, for calibrations that keep them (each token
            keeps its largest). Default: :func:`default_outlier_slots` (the average count rounded up, the best
            quality for the memory measured); ``calibration.outlier_cap`` keeps exactly what the growing caches
            keep, at the price of the unused slots.

    Sliding-window layers use transformers' own static layers.
    """

    def __init__(self, model: Any, calibration: SpectralKVConfig | str, *, max_cache_len: int,
                 bits: float | None = None, window: int | None = None, sink_tokens: int | None = None,
                 backend: str | None = None, outlier_slots: int | None = None) -> None:
        if not isinstance(calibration, SpectralKVConfig):
            calibration = SpectralKVConfig.from_pretrained(calibration)
        calibration.check_compatible(model)
        if bits is not None:
            calibration = calibration.with_bits(bits)
        self.calibration = calibration
        self.backend = default_backend() if backend is None else backend
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}.")
        attn = getattr(getattr(model, "config", None), "_attn_implementation", FUSED_ATTENTION)
        if attn != FUSED_ATTENTION:
            raise ValueError(
                f"StaticSpectralKVCache needs the {FUSED_ATTENTION!r} attention implementation (the model uses "
                f"{attn!r}): call spectralkv.fused.enable_fused(model) first.")
        softcap = getattr(_model_config(model), "attn_logit_softcapping", None)
        if softcap:
            raise ValueError(
                f"This model soft-caps its attention logits ({softcap}), which the fused decode kernel does not do; "
                "use SpectralKVCache (or FusedSpectralKVCache, which falls back to SDPA for such steps).")
        self.window = calibration.window if window is None else int(window)
        self.sink_tokens = calibration.sink_tokens if sink_tokens is None else int(sink_tokens)
        if self.window < 0 or self.sink_tokens < 0:
            raise ValueError(f"window and sink_tokens must be >= 0, got {self.window} and {self.sink_tokens}.")
        _check_slots(outlier_slots)
        if outlier_slots is None:
            outlier_slots = default_outlier_slots(calibration)
        self.outlier_slots = outlier_slots
        quantizers = calibration.quantizers()
        require_per_head_bases(next(iter(quantizers.values())), "StaticSpectralKVCache")
        shared: dict[Any, torch.Tensor] = {}
        layer_types, layer_kwargs = get_layer_types_and_kwargs(_model_config(model))
        compressed = set(calibration.compressed_layers)
        layers: list[CacheLayerMixin] = []
        for i, (lt, kw) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if i in compressed:
                layers.append(StaticCompressedLayer(quantizers[(i, "k")], quantizers[(i, "v")], self.sink_tokens,
                                                    self.window, max_cache_len, self.backend, outlier_slots, shared))
            elif lt in ("full_attention", "chunked_attention") or lt not in STATIC_LAYER_TYPE_MAPPING:
                raise ValueError(
                    f"Layer {i} ({lt}) is not compressed by this calibration; StaticSpectralKVCache compresses every "
                    "full-attention layer (the decode steps share one mask). Use FusedSpectralKVCache for this "
                    "calibration.")
            else:
                layers.append(STATIC_LAYER_TYPE_MAPPING[lt](max_cache_len=max_cache_len, **kw))
        super().__init__(layers=layers)
        self.max_cache_len = max_cache_len

    def set_left_padding(self, attention_mask: torch.Tensor) -> None:
        """Refuse padded batches (decode steps do not read a mask); a mask without padding is fine."""
        if left_padding(attention_mask) is not None:
            raise ValueError("StaticSpectralKVCache does not take padded batches; use FusedSpectralKVCache, or "
                             "generate each prompt alone.")

    @property
    def bits(self) -> float:
        return float(self.calibration.bits)

    def memory_report(self) -> dict[str, Any]:
        """Allocated bytes by part (static buffers: the capacity, whatever is in use) and the tokens held."""
        totals = {"codes": 0, "metadata": 0, "outliers": 0, "fp_slots": 0, "other_layers": 0}
        compressed = 0
        for layer in self.layers:
            if isinstance(layer, StaticCompressedLayer):
                for key, value in layer.memory().items():
                    totals[key] += value
                if layer.is_initialized:
                    compressed = max(compressed, int(layer.cumulative_length) - layer.ring - layer.sink_tokens)
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                totals["other_layers"] += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return {"bits": self.bits, "max_cache_len": self.max_cache_len, "compressed_tokens": max(0, compressed),
                **{f"{k}_bytes": v for k, v in totals.items()}, "resident_bytes": sum(totals.values())}
