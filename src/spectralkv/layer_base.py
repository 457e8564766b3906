"""A cache layer that keeps sinks and a recent window in full precision and compresses everything in between.

Shared by spectralkv and the baselines (KIVI-style, TurboQuant-style) so every method is compared with the same
sinks, the same window and the same flushing rule; only the ``TokenStore`` (how compressed tokens are held) differs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

FLUSH_CHUNK = 1024  # tokens encoded at once when a long prefill is flushed (bounds temporary memory)


class GrowableBuffer:
    """``[B, capacity, *tail]`` tensor grown in fixed chunks along dim 1 (no full-cache ``torch.cat`` per step)."""

    def __init__(self, chunk: int = 128) -> None:
        self.chunk = chunk
        self.data: torch.Tensor | None = None
        self.length = 0

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[1]
        if self.data is None:
            cap = -(-n // self.chunk) * self.chunk
            self.data = torch.empty(x.shape[0], cap, *x.shape[2:], dtype=x.dtype, device=x.device)
        elif self.length + n > self.data.shape[1]:
            cap = -(-(self.length + n) // self.chunk) * self.chunk
            grown = torch.empty(self.data.shape[0], cap, *self.data.shape[2:], dtype=self.data.dtype,
                                device=self.data.device)
            grown[:, : self.length] = self.data[:, : self.length]
            self.data = grown
        self.data[:, self.length : self.length + n] = x
        self.length += n

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[:, : self.length]

    def select_batch(self, index: torch.Tensor) -> None:
        if self.data is not None:
            self.data = self.data.index_select(0, index.to(self.data.device))

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    @property
    def nbytes(self) -> int:
        """Resident bytes (allocated capacity)."""
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class TokenStore(ABC):
    """How one method holds compressed keys (or values) of one layer."""

    #: tokens must be flushed into the store in multiples of this (KIVI quantizes keys in groups of tokens)
    flush_multiple: int = 1
    #: whether ``append`` takes the tokens' positions (``positions=[B, n]``): a store that centres keys per RoPE
    #: position. The layer passes them only to such stores.
    needs_positions: bool = False

    @abstractmethod
    def append(self, x: torch.Tensor) -> None:
        """Compress and store ``[B, H, n, D]`` (``n`` a multiple of ``flush_multiple``)."""

    @abstractmethod
    def decode(self, dtype: torch.dtype) -> torch.Tensor | None:
        """All stored tokens as ``[B, H, N, D]`` in ``dtype`` (None when empty)."""

    def decode_into(self, out: torch.Tensor) -> None:
        """Write all stored tokens into ``out`` ``[B, H, N, D]``: a slice of the tensor a decode step attends over
        (stores that can decode in place override this to spare the copy)."""
        out.copy_(self.decode(out.dtype))

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def select_batch(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat batch rows by ``index`` (beam search, num_return_sequences)."""

    @abstractmethod
    def memory(self) -> dict[str, int]:
        """Resident bytes by part: ``{"codes": ..., "metadata": ...}``."""

    @abstractmethod
    def bits_per_token(self) -> float:
        """Bits the method's accounting promises per compressed token (all heads), codes and metadata."""


StoreFactory = Callable[[], TokenStore]


class CompressedLayer(DynamicLayer):
    """Full-precision sinks + compressed middle + full-precision recent window.

    ``self.keys`` / ``self.values`` hold the recent window (model dtype); tokens leave the window into the store
    oldest first. ``update`` returns the cache as it was before the call (decoded) followed by the new tokens in full
    precision, so the forward that writes tokens attends to them exactly (prefill is never degraded).

    ``flush_block``: during decoding the window may grow to ``window + flush_block - 1`` tokens before its oldest
    tokens are compressed together, so the store is written once every ``flush_block`` steps instead of every step
    (fewer kernel launches per step; more tokens exact, never fewer). 1 (the default) compresses each token as soon
    as it leaves the window, which keeps every row of a left-padded batch cached exactly as if generated alone.
    """

    is_croppable = False  # a flushed token cannot be restored to full precision, so a rollback would leave a trace

    def __init__(self, key_store: StoreFactory, value_store: StoreFactory, sink_tokens: int, window: int,
                 flush_block: int = 1) -> None:
        super().__init__()
        if isinstance(flush_block, bool) or not isinstance(flush_block, int) or flush_block < 1:
            raise ValueError(f"flush_block must be an integer >= 1 (tokens compressed together), got {flush_block!r}.")
        self._factories = (key_store, value_store)
        self.sink_tokens = int(sink_tokens)
        self.window = int(window)
        self.flush_block = int(flush_block)
        self.cumulative_length = 0
        self.key_store: TokenStore | None = None
        self.value_store: TokenStore | None = None
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        # Left padding per row ([B] long) of a padded batch; see ``set_left_padding``.
        self.left_padding: torch.Tensor | None = None
        self._sinks_requantized = 0  # sink positions already checked by ``_requantize_padded_sinks``

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.sink_keys, self.sink_values = self.keys, self.values
        self.key_store, self.value_store = self._factories[0](), self._factories[1]()
        if self.left_padding is not None and self.left_padding.numel() != b:
            raise ValueError(f"left padding was set for {self.left_padding.numel()} rows, but the batch has {b}.")
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = self._assemble(self.sink_keys, self.key_store, self.keys, key_states)
        values = self._assemble(self.sink_values, self.value_store, self.values, value_states)
        self._ingest(key_states, value_states)
        return keys, values

    def ingest(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store ``[B, H, n, D]`` tokens as ``update`` would, without returning the cache to attend over.

        For a cache filled from elsewhere (tokens another process computed, a benchmark's synthetic prefill):
        ``update`` would also decode the whole store into a full-precision copy on every call."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._ingest(key_states, value_states)

    def _assemble(self, sinks: torch.Tensor, store: TokenStore, recent: torch.Tensor, new: torch.Tensor
                  ) -> torch.Tensor:
        """``[sinks, store decoded, recent, new]`` along the tokens, the store decoded straight into its slice."""
        n = len(store)
        if not n:
            parts = [p for p in (sinks, recent, new) if p.shape[2] > 0] or [new]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        s, r = sinks.shape[2], recent.shape[2]
        out = new.new_empty(new.shape[0], new.shape[1], s + n + r + new.shape[2], new.shape[3])
        out[:, :, :s] = sinks
        store.decode_into(out[:, :, s : s + n])
        out[:, :, s + n : s + n + r] = recent
        out[:, :, s + n + r :] = new
        return out

    def set_left_padding(self, left_padding: torch.Tensor) -> None:
        """Declare the left padding of each row (``[B]`` counts) before the first ``update``.

        Sinks are positional: without this, in a left-padded batch the first ``sink_tokens`` positions of a shorter
        row are padding, and its real first tokens (the attention sink) get compressed. With it, the full-precision
        region covers ``max(padding) + sink_tokens`` positions; positions in it beyond a row's own sinks are replaced
        by their compressed round trip once they leave the recent window, exactly when the row generated alone would
        compress them, so every row is cached as if it were generated alone.
        """
        if self.cumulative_length:
            raise ValueError("set_left_padding must be called before the first update (the prefill).")
        self.left_padding = torch.as_tensor(left_padding, dtype=torch.long).reshape(-1).cpu()

    @property
    def _sink_length(self) -> int:
        pad = 0 if self.left_padding is None else int(self.left_padding.max())
        return self.sink_tokens + pad

    def _ingest(self, k: torch.Tensor, v: torch.Tensor,
                joined: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Store new tokens. ``joined``: the current window followed by ``k``/``v``, when the caller has built it
        anyway (a decode step's kernel tensors); its view then becomes the window, saving a concatenation and a copy."""
        n = k.shape[2]
        self.cumulative_length += n
        room = max(0, self._sink_length - self.sink_keys.shape[2])
        if room:
            self.sink_keys = torch.cat([self.sink_keys, k[:, :, :room]], dim=2)
            self.sink_values = torch.cat([self.sink_values, v[:, :, :room]], dim=2)
            k, v = k[:, :, room:], v[:, :, room:]
            joined = None  # some of the new tokens became sinks: not what ``joined`` holds
        if joined is not None:
            self._set_recent(*joined, compact=False)
        elif k.shape[2] > 0:
            self._push_recent(k, v)
        if self.left_padding is not None:
            self._requantize_padded_sinks()

    def _push_recent(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self._set_recent(torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2))

    def _set_recent(self, keys: torch.Tensor, values: torch.Tensor, compact: bool = True) -> None:
        """Make ``keys``/``values`` (old window + new tokens) the window, flushing its overflow into the stores.

        ``compact=False`` keeps the remaining window as a view of ``keys``/``values`` (no copy): only for callers whose
        tensors are small (a decode step's sinks + window + new token), since the view keeps all of them alive."""
        self.keys, self.values = keys, values
        multiple = max(self.key_store.flush_multiple, self.value_store.flush_multiple)
        excess = self.keys.shape[2] - self.window
        if excess < self.flush_block:
            return
        overflow = excess // multiple * multiple
        if overflow <= 0:
            return
        chunk = max(multiple, FLUSH_CHUNK // multiple * multiple)
        first = self._sink_length + len(self.key_store)  # slot of the first token leaving the window
        for start in range(0, overflow, chunk):
            stop = min(overflow, start + chunk)
            self._append(self.key_store, self.keys[:, :, start:stop], first + start)
            self._append(self.value_store, self.values[:, :, start:stop], first + start)
        self.keys = self.keys[:, :, overflow:]
        self.values = self.values[:, :, overflow:]
        if compact:
            self.keys, self.values = self.keys.contiguous(), self.values.contiguous()

    def positions(self, start: int, stop: int) -> torch.Tensor:
        """``[B, stop - start]`` RoPE positions of cache slots ``start:stop``: the slot, less the row's left padding
        (what ``generate`` gives a left-padded row, whose positions start at its first real token)."""
        slots = torch.arange(start, stop, device=self.device)
        if self.left_padding is None:
            return slots.unsqueeze(0)
        return slots.unsqueeze(0) - self.left_padding.to(self.device).unsqueeze(1)

    def _append(self, store: TokenStore, x: torch.Tensor, first_slot: int) -> None:
        """``store.append(x)``, with the tokens' positions when the store centres them per position."""
        if store.needs_positions:
            store.append(x, positions=self.positions(first_slot, first_slot + x.shape[2]))
        else:
            store.append(x)

    def _requantize_padded_sinks(self) -> None:
        """Round-trip the extra sink positions of less-padded rows that have left the recent window."""
        if max(self.key_store.flush_multiple, self.value_store.flush_multiple) > 1:
            return  # grouped stores quantize blocks of tokens: no per-token round trip, keep them exact
        stop = min(self.sink_keys.shape[2], self.cumulative_length - self.window)
        start = self._sinks_requantized
        if stop <= start:
            return
        pos = torch.arange(start, stop)
        own_sinks_end = (self.left_padding + self.sink_tokens).unsqueeze(1)  # [B, 1]
        mask = (pos.unsqueeze(0) >= own_sinks_end).to(self.sink_keys.device)[:, None, :, None]  # [B, 1, n, 1]
        if bool(mask.any()):
            for name, factory in (("sink_keys", self._factories[0]), ("sink_values", self._factories[1])):
                fp = getattr(self, name)
                store = factory()
                self._append(store, fp[:, :, start:stop], start)
                rt = torch.where(mask, store.decode(fp.dtype), fp[:, :, start:stop])
                setattr(self, name, torch.cat([fp[:, :, :start], rt, fp[:, :, stop:]], dim=2))
        self._sinks_requantized = stop

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    # -- batch manipulation (exact on codes: no lossy round trip) ---------------------------------------------------
    def _select(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.sink_keys = self.sink_keys.index_select(0, index)
        self.sink_values = self.sink_values.index_select(0, index)
        self.key_store.select_batch(index)
        self.value_store.select_batch(index)
        if self.left_padding is not None:
            self.left_padding = self.left_padding.index_select(0, index.cpu())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(torch.as_tensor(indices))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "A compressed KV cache cannot be cropped back to full precision, so assisted/speculative decoding is not "
            "supported with spectralkv. Generate without `assistant_model` / `prompt_lookup_num_tokens`, or detach "
            "spectralkv first."
        )

    def reset(self) -> None:
        self.cumulative_length = 0
        self.keys = self.values = None
        self.key_store = self.value_store = None
        self.sink_keys = self.sink_values = None
        self.left_padding = None
        self._sinks_requantized = 0
        self.is_initialized = False

    # -- accounting ------------------------------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Resident bytes of this layer by part, and token counts."""
        if not self.is_initialized:
            return {"codes": 0, "metadata": 0, "sinks": 0, "window": 0, "compressed_tokens": 0, "fp_tokens": 0}
        ks, vs = self.key_store.memory(), self.value_store.memory()

        def nb(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        return {
            "codes": ks["codes"] + vs["codes"],
            "metadata": ks["metadata"] + vs["metadata"],
            "sinks": nb(self.sink_keys) + nb(self.sink_values),
            "window": nb(self.keys) + nb(self.values),
            "compressed_tokens": len(self.key_store),
            "fp_tokens": self.sink_keys.shape[2] + self.keys.shape[2],
        }
