"""``SpectralKVCache``: a real transformers ``Cache`` whose full-attention layers hold packed spectral codes."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs

from .config import SpectralKVConfig
from .layer_base import CompressedLayer, GrowableBuffer, TokenStore
from .quantizer import Outliers, SpectralQuantizer


class OutlierBuffer:
    """The exact outliers of a store: per-token counts ``[B, N]`` plus token-major entries (see :class:`Outliers`)."""

    def __init__(self) -> None:
        self.counts = GrowableBuffer()
        self.index = GrowableBuffer(chunk=1024)  # [1, E]
        self.values = GrowableBuffer(chunk=1024)

    def append(self, o: Outliers) -> None:
        self.counts.append(o.counts)
        self.index.append(o.index[None])
        self.values.append(o.values[None])

    @property
    def entries(self) -> int:
        return self.index.length

    def view(self, last: int | None = None) -> Outliers | None:
        """All outliers, or those of the last ``last`` tokens."""
        counts = self.counts.view()
        if counts is None:
            return None
        e = self.entries
        if last is None:  # no count sum, so no device sync on a decode step
            return Outliers(counts, self.index.data[0, :e], self.values.data[0, :e])
        tail = counts[:, counts.shape[1] - last :]
        n = int(tail.long().sum())
        return Outliers(tail, self.index.data[0, e - n : e], self.values.data[0, e - n : e])

    def select_batch(self, index: torch.Tensor) -> None:
        """Rows ``index`` (reordered, repeated): the entries are regrouped token-major for the new rows."""
        o = self.view()
        if o is None:
            return
        index = index.to(o.counts.device)
        rows, toks = o.positions()
        new_row, entry = (rows.unsqueeze(0) == index.unsqueeze(1)).nonzero(as_tuple=True)  # [B', E] matches
        order = torch.argsort(toks[entry] * index.numel() + new_row, stable=True)
        entry = entry[order]
        self.counts.select_batch(index)
        for buf, src in ((self.index, o.index), (self.values, o.values)):
            buf.data, buf.length = src[entry][None].clone(), int(entry.numel())

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes + self.index.nbytes + self.values.nbytes


class SpectralStore(TokenStore):
    """Packed code rows ``[B, N, row_bytes]`` (uint8), optional per-token scales ``[B, N, H]`` (fp16, or log8
    bytes), and the exact outliers when the quantizer keeps them.

    With a position-centred quantizer (RoPE-aware keys) ``append`` takes the tokens' positions; the store keeps only
    each row's first position, since a cache layer appends consecutive positions (no per-token metadata)."""

    def __init__(self, quantizer: SpectralQuantizer) -> None:
        self.quantizer = quantizer
        self.needs_positions = quantizer.position_centred
        self.codes = GrowableBuffer()
        self.scales = GrowableBuffer()
        self.outliers = OutlierBuffer()
        self.first_position: torch.Tensor | None = None  # [B, 1] position of each row's first stored token
        # Whether every row's tokens sit at the same positions (the first append gave them as one [1, n] row, as a
        # cache layer does without left padding): decoding then computes each position's centre once, not per row.
        self.rows_share_positions = False

    def _positions(self, start: int, stop: int) -> torch.Tensor | None:
        if self.first_position is None:
            return None
        first = self.first_position[:1] if self.rows_share_positions else self.first_position
        return first + torch.arange(start, stop, device=first.device)

    def _check_positions(self, x: torch.Tensor, positions: torch.Tensor | None) -> None:
        if not self.needs_positions:
            return
        if positions is None:
            raise ValueError("This store's quantizer centres keys on their RoPE positions: append(x, positions=...).")
        positions = torch.as_tensor(positions, device=x.device).long()
        shared = positions.dim() == 1 or positions.shape[0] == 1
        positions = positions.expand(x.shape[0], x.shape[2]) if positions.dim() == 2 else positions.expand(
            x.shape[0], -1)
        if self.first_position is None:
            self.first_position = positions[:, :1].clone()
            self.rows_share_positions = shared
        elif positions.device.type == "cpu" and not torch.equal(
                positions, self._positions(len(self), len(self) + x.shape[2]).expand_as(positions)):
            # checked where it costs no device sync (a cache layer always appends consecutive positions)
            raise ValueError("A position-centred store holds consecutive positions; these do not follow the last "
                             "stored token's.")

    def append(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        self._check_positions(x, positions)
        packed, scales, outliers = self.quantizer.encode_with_outliers(x, positions=positions)
        self.codes.append(packed)
        if scales is not None:
            self.scales.append(scales)
        if outliers is not None:
            self.outliers.append(outliers)

    def decode(self, dtype: torch.dtype) -> torch.Tensor | None:
        codes = self.codes.view()
        if codes is None or codes.shape[1] == 0:
            return None
        return self.quantizer.decode(codes, self.scales.view(), dtype, self.outliers.view(),
                                     positions=self._positions(0, len(self)))

    def decode_into(self, out: torch.Tensor) -> None:
        self.quantizer.decode(self.codes.view(), self.scales.view(), out.dtype, self.outliers.view(),
                              positions=self._positions(0, len(self)), out=out)

    def decode_tail(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """The last ``n`` tokens decoded (the rest untouched)."""
        codes = self.codes.view()[:, -n:]
        scales = self.scales.view()
        return self.quantizer.decode(codes, None if scales is None else scales[:, -n:], dtype, self.outliers.view(n),
                                     positions=self._positions(len(self) - n, len(self)))

    def __len__(self) -> int:
        return self.codes.length

    def select_batch(self, index: torch.Tensor) -> None:
        self.codes.select_batch(index)
        self.scales.select_batch(index)
        self.outliers.select_batch(index)
        if self.first_position is not None:
            self.first_position = self.first_position.index_select(0, index.to(self.first_position.device))

    def memory(self) -> dict[str, int]:
        return {"codes": self.codes.nbytes, "metadata": self.scales.nbytes + self.outliers.nbytes}

    def bits_per_token(self) -> float:
        """Codes + scales + outlier counts per token, plus the outlier entries actually stored, per token."""
        q = self.quantizer
        if not len(self):
            return float(q.bits_per_token)
        return q.bits_per_token + q.outlier_entry_bits * self.outliers.entries / (len(self) * self.codes.data.shape[0])


def left_padding(attention_mask: Any) -> torch.Tensor | None:
    """Leading padding count per row of a 2-D ``[B, T]`` 0/1 mask (None if not such a mask or nothing is padded)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    pads = (attention_mask.detach().long().cumsum(-1) == 0).sum(-1).cpu()
    return pads if bool((pads > 0).any()) else None


def _model_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


class SpectralKVCache(Cache):
    """KV cache for ``generate``: compressed full-attention layers, ordinary layers elsewhere.

    Args:
        model: the model (or its config) the cache serves; checked against the calibration.
        calibration: a :class:`SpectralKVConfig` (or a path / Hub id to load one from).
        bits: budget in bits per coordinate (default: the calibration's active budget).
        window: recent tokens kept in full precision (default: the calibration's, 32).
        sink_tokens: leading tokens kept in full precision (default: the calibration's, 4).
        flush_block: tokens leaving the window compressed together, one write every ``flush_block`` decode steps
            (default 1: every step; see :class:`CompressedLayer`).

    Sliding-window layers (Mistral/Gemma-style ``layer_types``) keep their bounded window in full precision with
    transformers' own ``DynamicSlidingWindowLayer``: their memory does not grow with the context.
    """

    def __init__(
        self,
        model: Any,
        calibration: SpectralKVConfig | str,
        *,
        bits: float | None = None,
        window: int | None = None,
        sink_tokens: int | None = None,
        flush_block: int = 1,
    ) -> None:
        if not isinstance(calibration, SpectralKVConfig):
            calibration = SpectralKVConfig.from_pretrained(calibration)
        calibration.check_compatible(model)
        if bits is not None:
            calibration = calibration.with_bits(bits)
        self.calibration = calibration
        self.window = calibration.window if window is None else int(window)
        self.sink_tokens = calibration.sink_tokens if sink_tokens is None else int(sink_tokens)
        if self.window < 0 or self.sink_tokens < 0:
            raise ValueError(f"window and sink_tokens must be >= 0, got {self.window} and {self.sink_tokens}.")
        self.flush_block = flush_block  # checked by each CompressedLayer
        quantizers = calibration.quantizers()
        layer_types, layer_kwargs = get_layer_types_and_kwargs(_model_config(model))
        compressed = set(calibration.compressed_layers)
        layers = []
        for i, (lt, kw) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if i in compressed:
                layers.append(self._compressed_layer(quantizers[(i, "k")], quantizers[(i, "v")]))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[lt](**kw))
        super().__init__(layers=layers)

    def _compressed_layer(self, qk: SpectralQuantizer, qv: SpectralQuantizer) -> CompressedLayer:
        """The cache layer of one compressed full-attention layer (subclasses return their own kind)."""
        return CompressedLayer(lambda: SpectralStore(qk), lambda: SpectralStore(qv), self.sink_tokens, self.window,
                               self.flush_block)

    def set_left_padding(self, attention_mask: torch.Tensor) -> None:
        """Protect each row's own sinks in a left-padded batch; call before the prefill with its 2-D mask.

        The hook does this for ``generate``; call it yourself when you pass this cache explicitly with a padded batch.
        See :meth:`CompressedLayer.set_left_padding`.
        """
        pads = left_padding(attention_mask)
        if pads is None:
            return
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                layer.set_left_padding(pads)

    @property
    def bits(self) -> float:
        return float(self.calibration.bits)

    def memory_report(self) -> dict[str, Any]:
        """Resident bytes by part and per layer, against what an fp16 ``DynamicCache`` would hold for the same tokens.

        ``accounted_bytes`` is what the bit accounting promises for the compressed tokens (codes + scales);
        ``resident_bytes`` is what the buffers really occupy (chunked growth included).
        """
        per_layer = []
        totals = {"codes": 0, "metadata": 0, "sinks": 0, "window": 0, "other_layers": 0}
        accounted = 0.0
        compressed_tokens = 0
        fp16 = 0
        for i, layer in enumerate(self.layers):
            if isinstance(layer, CompressedLayer):
                m = layer.memory()
                per_layer.append({"layer": i, **m})
                for key in ("codes", "metadata", "sinks", "window"):
                    totals[key] += m[key]
                if layer.is_initialized:
                    n = m["compressed_tokens"]
                    batch = layer.keys.shape[0]
                    accounted += n * batch * (layer.key_store.bits_per_token() + layer.value_store.bits_per_token()) / 8
                    compressed_tokens = max(compressed_tokens, n)
                    h, d = layer.keys.shape[1], layer.keys.shape[3]
                    fp16 += batch * layer.get_seq_length() * h * d * 2 * 2
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                nb = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                totals["other_layers"] += nb
                fp16 += layer.keys.numel() * 2 * 2
        resident = sum(totals.values())
        seq = self.get_seq_length()
        return {
            "bits": self.bits,
            "seq_length": seq,
            "compressed_tokens": compressed_tokens,
            **{f"{k}_bytes": v for k, v in totals.items()},
            "compressed_resident_bytes": totals["codes"] + totals["metadata"],
            "accounted_bytes": accounted,
            "resident_bytes": resident,
            "fp16_bytes": fp16,
            "saved_fraction": 1 - resident / fp16 if fp16 else 0.0,
            "per_layer": per_layer,
        }
