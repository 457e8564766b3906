"""Fused decode attention for transformers models: single-token decode steps attend straight from packed codes.

Usage::

    from spectralkv.fused import FusedSpectralKVCache, enable_fused

    enable_fused(model)  # registers "spectralkv_fused" and selects it (prefill stays SDPA)
    cache = FusedSpectralKVCache(model, calibration)
    model.generate(**inputs, past_key_values=cache)

How it plugs in. In transformers 5.x the attention module calls ``past_key_values.update(k, v, layer_idx)`` and
hands whatever comes back, unchanged, to the attention function selected by ``config._attn_implementation``; the
function receives ``(module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)`` and never the cache
itself. So on a single-token step :class:`FusedCompressedLayer` returns two :class:`PackedKV` handles instead of
decoded tensors: a snapshot of the layer's packed buffers (code rows and scales of the compressed tokens, taken
before the step's window flush), the full-precision sinks + recent window + new token, and the mask layout. The
function registered as ``"spectralkv_fused"`` (:func:`fused_attention_forward`) recognises the handles and calls

* the Triton kernel (:func:`spectralkv.kernels.decode_attention.decode_attention`) on CUDA, or
* the PyTorch path (:func:`spectralkv.kernels.cpu_attention.decode_attention_rows`, the reference's numbers on the
  row decoder's grouped columns) on CPU, or on CUDA without a working Triton (with a warning);

anything else (prefill, multi-token steps, plain tensors) goes to transformers' SDPA function. The mask function
registered under the same name is transformers' ``sdpa_mask``, so padded batches get the same boolean masks as with
SDPA. A handle that reaches any other attention function still works: any torch operation or attribute access on
it materialises the decoded tensor (slow, but correct).

Backends (``backend=`` of the cache, default from the ``SPECTRALKV_BACKEND`` environment variable, else
``"auto"``): ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"torch"`` (always PyTorch), ``"triton"``
(always Triton; on CPU only under ``TRITON_INTERPRET=1``, for tests). Nothing here imports Triton unless a Triton
backend is actually used.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .cache import SpectralKVCache, SpectralStore
from .layer_base import CompressedLayer
from .quantizer import SpectralQuantizer

FUSED_ATTENTION = "spectralkv_fused"
BACKENDS = ("auto", "torch", "triton")
_TRITON_STATE: dict[str, Any] = {}


def require_per_head_bases(quantizer: SpectralQuantizer, what: str) -> None:
    """Refuse a calibration whose KV heads share a basis (``head_group`` > 1): the decode kernels rotate each query
    by its own KV head's basis and read that head's codes alone."""
    if quantizer.head_group > 1:
        raise NotImplementedError(
            f"{what} attends with one basis per KV head, but this calibration codes {quantizer.head_group} KV heads "
            f"in one basis (head_group={quantizer.head_group}). Use SpectralKVCache / attach(..., fused=False) (the "
            "dequantizing cache serves it), or calibrate with --head-group 1 for the fused kernels.")


def default_backend() -> str:
    value = os.environ.get("SPECTRALKV_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"SPECTRALKV_BACKEND must be one of {BACKENDS}, got {value!r}.")
    return value


def _kernels() -> Any | None:
    """The Triton kernel modules, imported on first use; None (with one warning) when Triton does not work."""
    if "modules" not in _TRITON_STATE:
        try:
            from .kernels import decode_attention, encode

            _TRITON_STATE["modules"] = (decode_attention, encode)
        except Exception as exc:  # ImportError, or a Triton that fails to initialise
            _TRITON_STATE["modules"] = None
            _TRITON_STATE["error"] = exc
    return _TRITON_STATE["modules"]


def use_triton(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` runs the Triton kernels for tensors on ``device``."""
    if backend == "torch":
        return False
    if backend == "auto":
        if device.type != "cuda":
            return False
        if _kernels() is None:
            if not _TRITON_STATE.get("warned"):
                _TRITON_STATE["warned"] = True
                warnings.warn(
                    f"spectralkv: Triton is not usable ({_TRITON_STATE['error']!r}); fused decode attention falls back "
                    "to the PyTorch reference (correct, but it decodes the whole cache every step).",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return False
        return True
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"backend='triton' on {device.type} needs TRITON_INTERPRET=1 (the Triton interpreter).")
        if _kernels() is None:
            raise RuntimeError(f"backend='triton' but Triton is not usable: {_TRITON_STATE['error']!r}")
        return True
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")


# ---------------------------------------------------------------------------------------------------------------
# What update() returns on a decode step
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeSnapshot:
    """One layer's cache at one decode step, in attention order ``[sinks, compressed, recent, new]``.

    The compressed part is views of the packed buffers (a later append writes past their end, and a grown buffer is
    a new tensor, so the views stay valid); ``k_fp``/``v_fp`` are the sinks, recent window and new token.
    """

    keys: Any  # spectralkv.kernels.ref.PackedSide
    values: Any
    k_fp: torch.Tensor  # [B, Hkv, W, D] model dtype
    v_fp: torch.Tensor
    n_sinks: int
    backend: str

    @property
    def n_compressed(self) -> int:
        return self.keys.length

    @property
    def total_length(self) -> int:
        return self.n_compressed + self.k_fp.shape[2]

    def split_mask(self, mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``[B, total]`` boolean mask -> (compressed ``[B, N]``, full precision ``[B, W]``)."""
        if mask is None:
            return None, None
        ns, nc = self.n_sinks, self.n_compressed
        comp = mask[:, ns : ns + nc] if nc else None
        fp = torch.cat([mask[:, :ns], mask[:, ns + nc :]], dim=1)
        return comp, fp

    def attend(self, q: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of ``q`` ``[B, Hq, D]`` over this snapshot -> ``[B, Hq, D]``."""
        from .kernels.cpu_attention import decode_attention_rows

        comp_mask, fp_mask = self.split_mask(mask)
        args = (q, self.keys, self.values, self.k_fp, self.v_fp, comp_mask, fp_mask, scaling)
        if use_triton(self.backend, q.device):
            return _kernels()[0].decode_attention(*args)
        return decode_attention_rows(*args)

    def materialize(self, side: str, dtype: torch.dtype) -> torch.Tensor:
        """The decoded ``[B, Hkv, total, D]`` keys (``side="k"``) or values, as the unfused cache returns them."""
        packed, fp = (self.keys, self.k_fp) if side == "k" else (self.values, self.v_fp)
        ns = self.n_sinks
        parts = [fp[:, :, :ns]]
        if packed.length:
            parts.append(packed.quantizer.decode(packed.codes, packed.scales, dtype, packed.outliers,
                                                 positions=packed.token_positions()))
        parts.append(fp[:, :, ns:])
        return torch.cat(parts, dim=2)


@dataclass(frozen=True)
class StaticDecodeView:
    """What a :class:`~spectralkv.static.StaticCompressedLayer` returns (as keys and as values) on a decode step:
    its preallocated buffers, with tensors saying which parts hold tokens, so every step has the same shapes and
    addresses (what ``torch.compile`` and CUDA graphs need).

    Compressed rows ``[0, comp_lengths)`` are in use; ``k_fp``/``v_fp`` are the sinks and the ring of recent tokens
    (new token included), of which ``fp_mask`` marks the slots in use. Only :func:`fused_attention_forward` reads it:
    there is no decoded tensor to fall back to, since the number of tokens is a tensor, not a shape.
    """

    keys: Any  # spectralkv.kernels.ref.PackedSide over the whole preallocated rows
    values: Any
    k_fp: torch.Tensor  # [B, Hkv, S + R, D] model dtype
    v_fp: torch.Tensor
    comp_lengths: torch.Tensor  # [B] long
    fp_mask: torch.Tensor  # [B, S + R] bool
    length: torch.Tensor  # 0-d long: tokens held, new one included
    tables: tuple[Any, Any]  # the key and value SpectralTables on this device
    triton: bool
    num_splits: int = 1  # the Triton kernel's compressed splits per sequence and KV head

    def check_unpadded(self, mask: torch.Tensor) -> None:
        """Refuse a padded batch: transformers' boolean mask must allow every position held. Raises eagerly; inside
        a compiled step (no Python errors there) it is a device-side assert."""
        n = mask.shape[-1]
        held = torch.arange(n, device=mask.device) < self.length.to(mask.device)
        ok = (mask.reshape(mask.shape[0], -1, n)[:, -1] | ~held).all()
        message = ("StaticSpectralKVCache does not take padded batches (its decode steps do not read the mask); use "
                   "FusedSpectralKVCache, or generate each prompt alone.")
        if torch.compiler.is_compiling():
            torch._assert_async(ok, message)
        elif not bool(ok):
            raise ValueError(message)

    def attend(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of ``q`` ``[B, Hq, D]`` over the tokens in use -> ``[B, Hq, D]``."""
        k, v = self.keys, self.values
        if self.triton:
            return _kernels()[0].decode_attention_launch(
                q, self.tables[0], k.codes, k.scales, self.tables[1], v.codes, v.scales, self.k_fp, self.v_fp, None,
                self.fp_mask, scaling, k_outliers=k.outliers, v_outliers=v.outliers, comp_lengths=self.comp_lengths,
                k_positions=k.positions, num_splits=self.num_splits)
        from .kernels.ref import decode_attention_ref

        return decode_attention_ref(q, k, v, self.k_fp, self.v_fp, None, self.fp_mask, scaling,
                                    comp_lengths=self.comp_lengths, tables=self.tables)


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, PackedKV):
        return obj.materialize()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


class PackedKV:
    """Stands in for the key (or value) tensor of a decode step; only :func:`fused_attention_forward` reads it
    without decoding. Any torch function, indexing or tensor attribute materialises the decoded tensor."""

    def __init__(self, snapshot: DecodeSnapshot, side: str) -> None:
        self.snapshot = snapshot
        self.side = side
        self._dense: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        fp = self.snapshot.k_fp if self.side == "k" else self.snapshot.v_fp
        return torch.Size((fp.shape[0], fp.shape[1], self.snapshot.total_length, fp.shape[3]))

    @property
    def dtype(self) -> torch.dtype:
        return self.snapshot.k_fp.dtype

    @property
    def device(self) -> torch.device:
        return self.snapshot.k_fp.device

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 4

    def materialize(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.snapshot.materialize(self.side, self.dtype)
        return self._dense

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.materialize()[index]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("snapshot", "side", "_dense"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*_unwrap(args), **_unwrap(kwargs or {}))

    def __repr__(self) -> str:
        return f"PackedKV(side={self.side!r}, shape={tuple(self.shape)}, compressed={self.snapshot.n_compressed})"


# ---------------------------------------------------------------------------------------------------------------
# Cache: stores with the Triton write path, layers that return handles on decode steps
# ---------------------------------------------------------------------------------------------------------------
class FusedSpectralStore(SpectralStore):
    """:class:`SpectralStore` whose ``append`` runs the Triton write kernel when the backend says so."""

    def __init__(self, quantizer: SpectralQuantizer, backend: str = "auto") -> None:
        super().__init__(quantizer)
        self.backend = backend

    def append(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        if not use_triton(self.backend, x.device):
            super().append(x, positions)
            return
        self._check_positions(x, positions)
        term = self.quantizer.position_term(positions, x.device, x.shape[0], x.shape[2])
        if term is not None:  # the kernel subtracts the mean; the per-position part goes first (in float32)
            x = x.float() - term
        packed, scales, outliers = _kernels()[1].spectral_encode_with_outliers(self.quantizer, x)
        self.codes.append(packed)
        if scales is not None:
            self.scales.append(scales)
        if outliers is not None:
            self.outliers.append(outliers)

    def packed(self) -> Any:
        from .kernels.ref import PackedSide

        codes = self.codes.view()
        if codes is None:
            raise RuntimeError("packed() on a store that was never appended to")
        scales = self.scales.view() if self.quantizer.token_scale else None
        outliers = self.outliers.view() if self.quantizer.outlier_threshold is not None else None
        return PackedSide(self.quantizer, codes, scales, outliers, self.first_position, self.rows_share_positions)


class FusedCompressedLayer(CompressedLayer):
    """:class:`CompressedLayer` that returns :class:`PackedKV` handles on single-token steps."""

    def __init__(self, quantizer_k: SpectralQuantizer, quantizer_v: SpectralQuantizer, sink_tokens: int, window: int,
                 backend: str = "auto", flush_block: int = 1) -> None:
        super().__init__(lambda: FusedSpectralStore(quantizer_k, backend),
                         lambda: FusedSpectralStore(quantizer_v, backend), sink_tokens, window, flush_block)
        self.backend = backend

    def _packed(self, store: FusedSpectralStore, like: torch.Tensor) -> Any:
        from .kernels.ref import PackedSide

        if len(store):
            return store.packed()
        q = store.quantizer
        codes = torch.empty(like.shape[0], 0, q.row_bytes, dtype=torch.uint8, device=like.device)
        scales = torch.empty(like.shape[0], 0, q.num_heads, dtype=q.scale_dtype, device=like.device)
        return PackedSide(q, codes, scales if q.token_scale else None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[Any, Any]:
        if key_states.shape[2] != 1:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_sinks = self.sink_keys.shape[2]
        snapshot = DecodeSnapshot(
            keys=self._packed(self.key_store, key_states),
            values=self._packed(self.value_store, value_states),
            k_fp=torch.cat([self.sink_keys, self.keys, key_states], dim=2),
            v_fp=torch.cat([self.sink_values, self.values, value_states], dim=2),
            n_sinks=n_sinks,
            backend=self.backend,
        )
        # the window after this step is the tail of the tensors just built for the kernel (no second concatenation)
        self._ingest(key_states, value_states, (snapshot.k_fp[:, :, n_sinks:], snapshot.v_fp[:, :, n_sinks:]))
        return PackedKV(snapshot, "k"), PackedKV(snapshot, "v")


class FusedSpectralKVCache(SpectralKVCache):
    """:class:`SpectralKVCache` for the ``"spectralkv_fused"`` attention implementation (see the module docstring).

    Same arguments, plus ``backend`` (``"auto"``, ``"torch"`` or ``"triton"``; default ``SPECTRALKV_BACKEND`` or
    ``"auto"``). With any other attention implementation it still gives correct results, decoding on every step.
    """

    def __init__(self, model: Any, calibration: Any, *, backend: str | None = None, **kwargs: Any) -> None:
        self.backend = default_backend() if backend is None else backend
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}.")
        super().__init__(model, calibration, **kwargs)

    def _compressed_layer(self, qk: Any, qv: Any) -> CompressedLayer:
        require_per_head_bases(qk, "FusedSpectralKVCache (fused decode attention)")
        return FusedCompressedLayer(qk, qv, self.sink_tokens, self.window, self.backend, self.flush_block)


# ---------------------------------------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------------------------------------
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias")


def _sdpa(module: torch.nn.Module, query: torch.Tensor, key: Any, value: Any, attention_mask: Any,
          dropout: float, scaling: float | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key = key.materialize() if isinstance(key, PackedKV) else key
    value = value.materialize() if isinstance(value, PackedKV) else value
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def fused_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``AttentionInterface``: fused decode for :class:`PackedKV`, SDPA otherwise.

    Falls back to SDPA over decoded tensors (same result, slower) for what the fused path does not do: more than one
    query token, dropout, soft-capping, learned sinks (``s_aux``), position biases, non-boolean or per-head masks.
    """
    if isinstance(key, StaticDecodeView):
        if query.shape[2] != 1 or dropout or any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS):
            raise NotImplementedError(
                "The static spectralkv cache serves single-token decode steps without dropout, soft-capping, learned "
                "sinks or position biases; use FusedSpectralKVCache for this model or step.")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
            key.check_unpadded(attention_mask)
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        return key.attend(query[:, :, 0, :], scale).unsqueeze(1), None  # the cache knows which slots hold tokens
    if not isinstance(key, PackedKV) or not isinstance(value, PackedKV):
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    snapshot = key.snapshot
    mask = attention_mask
    fusable = (
        query.shape[2] == 1
        and not dropout
        and not any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS)
        and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
                              and mask.shape[2] == 1 and mask.shape[-1] == snapshot.total_length))
    )
    if not fusable:
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    b = query.shape[0]
    if mask is not None:
        mask = mask[:, 0, 0, :].expand(b, -1)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    out = snapshot.attend(query[:, :, 0, :], mask, scale)  # [B, Hq, D]
    return out.unsqueeze(1), None  # [B, 1, Hq, D], like sdpa_attention_forward


def register(name: str = FUSED_ATTENTION) -> str:
    """Register the fused attention function and its mask function (``sdpa_mask``) under ``name`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fused_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def enable_fused(model: Any, name: str = FUSED_ATTENTION) -> str:
    """Register the fused attention and select it on ``model``; returns the previous implementation's name (pass it
    to ``model.set_attn_implementation`` to undo)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(register(name))
    return previous
