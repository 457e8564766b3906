"""CompressedLayer mechanics, SpectralStore/SpectralKVCache, and the memory accounting on the real SmolLM2.

Most tests drive a layer directly with synthetic keys/values so each assertion pins one rule: which tokens sit in the
full-precision sinks/window, which are compressed, that the compressed ones are exactly the quantizer's round trip,
and that batch manipulations (beam search, ``num_return_sequences``) move codes without a lossy round trip.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicLayer

from spectralkv import layer_base
from spectralkv.cache import SpectralKVCache, SpectralStore
from spectralkv.codebook import fit_codebooks
from spectralkv.layer_base import CompressedLayer, GrowableBuffer, TokenStore
from spectralkv.quantizer import SpectralQuantizer

H, D = 2, 16


@cache
def _codebooks() -> torch.Tensor:
    return fit_codebooks(torch.randn(4096, generator=torch.Generator().manual_seed(0)))


def make_quantizer(token_scale: bool = True, seed: int = 0) -> SpectralQuantizer:
    """A synthetic quantizer: random orthonormal basis per head, 4/2/1/0 bits on groups of 4 coordinates (x2)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(H, D, D, generator=g)).Q
    eig = torch.linspace(4.0, 0.1, D).expand(H, D).contiguous()
    bits = torch.tensor([4] * 8 + [2] * 8, dtype=torch.uint8).expand(H, D).contiguous()
    mean = torch.randn(H, D, generator=g)
    return SpectralQuantizer(mean, basis, eig, _codebooks(), bits, token_scale)


def make_layer(sink: int = 4, window: int = 8, token_scale: bool = True) -> tuple[CompressedLayer, SpectralQuantizer,
                                                                                  SpectralQuantizer]:
    qk, qv = make_quantizer(token_scale, 1), make_quantizer(token_scale, 2)
    layer = CompressedLayer(lambda: SpectralStore(qk), lambda: SpectralStore(qv), sink, window)
    return layer, qk, qv


def kv(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, n, D, generator=g) * 2, torch.randn(b, H, n, D, generator=g)


class LosslessStore(TokenStore):
    """Keeps tokens exactly; with it a CompressedLayer must behave like a DynamicLayer (tests the bookkeeping)."""

    def __init__(self, flush_multiple: int = 1) -> None:
        self.flush_multiple = flush_multiple
        self.parts: list[torch.Tensor] = []
        self.appends: list[int] = []

    def append(self, x: torch.Tensor) -> None:
        assert x.shape[2] % self.flush_multiple == 0
        self.appends.append(x.shape[2])
        self.parts.append(x.clone())

    def decode(self, dtype: torch.dtype) -> torch.Tensor | None:
        return torch.cat(self.parts, 2).to(dtype) if self.parts else None

    def __len__(self) -> int:
        return sum(p.shape[2] for p in self.parts)

    def select_batch(self, index: torch.Tensor) -> None:
        self.parts = [p.index_select(0, index) for p in self.parts]

    def memory(self) -> dict[str, int]:
        return {"codes": sum(p.numel() * p.element_size() for p in self.parts), "metadata": 0}

    def bits_per_token(self) -> float:
        return 32.0 * H * D


# -- bookkeeping: which token lives where -------------------------------------------------------------------------


@pytest.mark.parametrize("sink,window", [(4, 8), (0, 8), (4, 0), (0, 0), (3, 5)])
def test_counts_shapes_and_exact_new_tokens(sink: int, window: int) -> None:
    """After prefill and each decode step: sinks, window and store sizes follow the rule, get_seq_length counts all,
    the returned tensors have every token and the tokens of this call come back bit-exact."""
    layer, _, _ = make_layer(sink, window)
    total = 0
    for step, n in enumerate([20, 1, 1, 1, 3, 1]):
        k, v = kv(2, n, seed=step)
        rk, rv = layer.update(k, v)
        total += n
        assert rk.shape == (2, H, total, D) and rv.shape == (2, H, total, D)
        assert torch.equal(rk[:, :, -n:], k) and torch.equal(rv[:, :, -n:], v)
        n_sink = min(sink, total)
        n_win = min(window, total - n_sink)
        assert layer.sink_keys.shape[2] == n_sink
        assert layer.keys.shape[2] == n_win and layer.values.shape[2] == n_win
        assert len(layer.key_store) == len(layer.value_store) == total - n_sink - n_win
        assert layer.get_seq_length() == total
        assert layer.get_mask_sizes(1) == (total + 1, 0)
        m = layer.memory()
        assert m["compressed_tokens"] == total - n_sink - n_win and m["fp_tokens"] == n_sink + n_win


def test_returned_cache_is_sinks_codes_window_in_order() -> None:
    """The returned past is: sinks exact, compressed middle == quantizer.fake_quantize(originals), window exact."""
    sink, window = 4, 8
    layer, qk, qv = make_layer(sink, window)
    ks, vs = [], []
    for step, n in enumerate([30, 1, 1, 2, 1]):
        k, v = kv(2, n, seed=10 + step)
        layer.update(k, v)
        ks.append(k)
        vs.append(v)
    allk, allv = torch.cat(ks, 2), torch.cat(vs, 2)
    total = allk.shape[2]
    k_new, v_new = kv(2, 1, seed=99)
    rk, rv = layer.update(k_new, v_new)
    mid = slice(sink, total - window)
    for ret, orig, q in ((rk, allk, qk), (rv, allv, qv)):
        assert torch.equal(ret[:, :, :sink], orig[:, :, :sink])
        assert torch.equal(ret[:, :, total - window : total], orig[:, :, total - window :])
        expected = q.fake_quantize(orig[:, :, mid])
        torch.testing.assert_close(ret[:, :, mid], expected, rtol=0, atol=1e-5)
        err = (ret[:, :, mid] - orig[:, :, mid]).pow(2).mean() / orig[:, :, mid].pow(2).mean()
        assert 0 < err < 0.5  # compressed for real, and not garbage
    # codes in the store are exactly the quantizer's codes for the same tokens, in token order
    flushed = torch.cat([allk, k_new], 2)[:, :, sink : total + 1 - window]  # the call above flushed one more
    codes, scales = qk.encode(flushed)
    assert torch.equal(layer.key_store.codes.view(), codes)
    assert torch.equal(layer.key_store.scales.view(), scales)


def test_store_without_token_scale_has_no_metadata() -> None:
    layer, qk, _ = make_layer(2, 2, token_scale=False)
    k, v = kv(1, 20, seed=3)
    layer.update(k, v)
    assert layer.key_store.scales.view() is None
    m = layer.memory()
    assert m["metadata"] == 0 and m["codes"] > 0
    assert layer.key_store.bits_per_token() == qk.code_bits_per_token == H * (8 * 4 + 8 * 2)


def test_window_zero_sink_zero_compresses_everything_but_returns_new_exact() -> None:
    layer, qk, _ = make_layer(0, 0)
    k, v = kv(1, 10, seed=4)
    rk, _ = layer.update(k, v)
    assert torch.equal(rk, k)  # the writing forward sees its own tokens exactly
    assert len(layer.key_store) == 10 and layer.keys.shape[2] == 0 and layer.sink_keys.shape[2] == 0
    k2, v2 = kv(1, 1, seed=5)
    rk2, _ = layer.update(k2, v2)
    torch.testing.assert_close(rk2[:, :, :10], qk.fake_quantize(k), rtol=0, atol=1e-5)
    assert not torch.equal(rk2[:, :, :10], k)


@settings(max_examples=60, deadline=None)
@given(
    sink=st.integers(0, 5),
    window=st.integers(0, 9),
    multiple=st.sampled_from([1, 2, 4]),
    block=st.integers(1, 6),
    steps=st.lists(st.integers(1, 13), min_size=1, max_size=8),
)
def test_bookkeeping_with_lossless_store(sink: int, window: int, multiple: int, block: int, steps: list[int]) -> None:
    """With a lossless store the layer returns exactly every token ever written, in order; the store only receives
    multiples of ``flush_multiple`` and the window holds at most ``window + max(flush_multiple, flush_block) - 1``
    tokens."""
    layer = CompressedLayer(lambda: LosslessStore(multiple), lambda: LosslessStore(multiple), sink, window, block)
    seen_k, seen_v = [], []
    for i, n in enumerate(steps):
        k, v = kv(1, n, seed=i)
        seen_k.append(k)
        seen_v.append(v)
        rk, rv = layer.update(k, v)
        assert torch.equal(rk, torch.cat(seen_k, 2)) and torch.equal(rv, torch.cat(seen_v, 2))
        total = rk.shape[2]
        n_sink = min(sink, total)
        assert layer.sink_keys.shape[2] == n_sink
        assert len(layer.key_store) % multiple == 0
        assert layer.keys.shape[2] >= min(window, total - n_sink)
        assert layer.keys.shape[2] <= window + max(multiple, block) - 1
        assert n_sink + len(layer.key_store) + layer.keys.shape[2] == total == layer.get_seq_length()


def test_flush_block_writes_the_store_once_per_block() -> None:
    """Decoding with ``flush_block=5`` writes the store every 5th step (5 tokens at once), the window staying within
    ``window .. window + 4``; the codes are those of compressing each token on its own."""
    blocked = CompressedLayer(lambda: LosslessStore(), lambda: LosslessStore(), 2, 6, flush_block=5)
    layer, qk, qv = make_layer(2, 6)
    spectral = CompressedLayer(lambda: SpectralStore(qk), lambda: SpectralStore(qv), 2, 6, flush_block=5)
    k, v = kv(2, 40, seed=9)
    for c in (blocked, layer, spectral):
        c.update(k[:, :, :20], v[:, :, :20])  # prefill: 12 tokens compressed at once, whatever the block
    assert blocked.key_store.appends == [12] and blocked.keys.shape[2] == 6
    for t in range(20, 40):
        for c in (blocked, layer, spectral):
            rk, rv = c.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
            assert rk.shape[2] == t + 1
        step = t - 19
        assert blocked.key_store.appends == [12] + [5] * (step // 5)
        assert blocked.keys.shape[2] == 6 + step % 5 and spectral.keys.shape[2] == 6 + step % 5
        assert torch.equal(blocked.keys, k[:, :, t + 1 - blocked.keys.shape[2] : t + 1])  # the window is exact
    assert len(spectral.key_store) == len(layer.key_store) == 32  # 20 decode steps: 4 blocks of 5, 0 left over
    assert torch.equal(spectral.key_store.codes.view(), layer.key_store.codes.view())
    assert torch.equal(spectral.value_store.codes.view(), layer.value_store.codes.view())
    with pytest.raises(ValueError, match="flush_block"):
        CompressedLayer(lambda: LosslessStore(), lambda: LosslessStore(), 2, 6, flush_block=0)


def test_long_prefill_is_flushed_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill longer than FLUSH_CHUNK is encoded chunk by chunk (bounded temporaries) to the same codes."""
    monkeypatch.setattr(layer_base, "FLUSH_CHUNK", 8)
    chunked = CompressedLayer(lambda: LosslessStore(), lambda: LosslessStore(), 2, 3)
    k, v = kv(1, 30, seed=6)
    chunked.update(k, v)
    assert chunked.key_store.appends == [8, 8, 8, 1]
    layer, qk, _ = make_layer(2, 3)
    layer.update(k, v)
    assert torch.equal(layer.key_store.codes.view(), qk.encode(k[:, :, 2:27])[0])


# -- growth in chunks ----------------------------------------------------------------------------------------------


def test_growable_buffer_grows_in_chunks() -> None:
    buf = GrowableBuffer(chunk=128)
    ptrs = set()
    for i in range(300):
        buf.append(torch.full((2, 1, 5), i % 256, dtype=torch.uint8))
        ptrs.add(buf.data.data_ptr())
        assert buf.data.shape[1] % 128 == 0 and buf.data.shape[1] >= buf.length
    assert len(ptrs) == 3  # allocated at 128, 256, 384 tokens: never once per step
    assert buf.length == 300 and buf.nbytes == 2 * 384 * 5
    assert torch.equal(buf.view()[0, :, 0], torch.arange(300).to(torch.uint8))


def test_decode_steps_do_not_reallocate_codes() -> None:
    layer, _, _ = make_layer(0, 0)
    k, v = kv(1, 10, seed=7)
    layer.update(k, v)
    ptr = layer.key_store.codes.data.data_ptr()
    for i in range(100):
        layer.update(*kv(1, 1, seed=100 + i))
    assert layer.key_store.codes.data.data_ptr() == ptr  # 110 tokens still fit the first 128-token chunk
    layer.update(*kv(1, 20, seed=1000))
    assert layer.key_store.codes.data.data_ptr() != ptr and layer.key_store.codes.data.shape[1] == 256


# -- batch manipulation --------------------------------------------------------------------------------------------


def _snapshot(layer: CompressedLayer) -> dict[str, torch.Tensor]:
    return {
        "codes_k": layer.key_store.codes.view().clone(),
        "codes_v": layer.value_store.codes.view().clone(),
        "scales_k": layer.key_store.scales.view().clone(),
        "scales_v": layer.value_store.scales.view().clone(),
        "sink_k": layer.sink_keys.clone(),
        "sink_v": layer.sink_values.clone(),
        "win_k": layer.keys.clone(),
        "win_v": layer.values.clone(),
    }


def _check_selected(layer: CompressedLayer, before: dict[str, torch.Tensor], index: list[int]) -> None:
    after = _snapshot(layer)
    for name, t in before.items():
        assert torch.equal(after[name], t[index]), name
    assert layer.get_seq_length() == 23


@pytest.mark.parametrize(
    "op,arg,index",
    [
        ("reorder_cache", torch.tensor([2, 0, 0]), [2, 0, 0]),
        ("batch_repeat_interleave", 2, [0, 0, 1, 1, 2, 2]),
        ("batch_select_indices", torch.tensor([2, 0]), [2, 0]),
        ("batch_select_indices", [1], [1]),
    ],
)
def test_batch_ops_are_exact_on_codes(op: str, arg: object, index: list[int]) -> None:
    """Beam reordering, repeat-interleave and selection move codes/scales/fp parts by row, bit-exactly."""
    layer, _, _ = make_layer(3, 4)
    layer.update(*kv(3, 22, seed=8))
    layer.update(*kv(3, 1, seed=9))
    before = _snapshot(layer)
    getattr(layer, op)(arg)
    _check_selected(layer, before, index)
    rk, _ = layer.update(*kv(len(index), 1, seed=10))  # and it keeps working with the new batch size
    assert rk.shape == (len(index), H, 24, D)


def test_batch_ops_before_initialization_are_noops() -> None:
    layer, _, _ = make_layer()
    layer.reorder_cache(torch.tensor([0]))
    layer.batch_repeat_interleave(2)
    layer.batch_select_indices(torch.tensor([0]))
    assert not layer.is_initialized and layer.get_seq_length() == 0


def test_crop_refuses_clearly_and_reset_clears() -> None:
    layer, _, _ = make_layer()
    layer.update(*kv(1, 20, seed=11))
    assert CompressedLayer.is_croppable is False
    with pytest.raises(NotImplementedError, match="assisted"):
        layer.crop(-1)
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.is_initialized
    assert layer.memory()["compressed_tokens"] == 0
    rk, _ = layer.update(*kv(1, 5, seed=12))
    assert rk.shape[2] == 5 and layer.get_seq_length() == 5


def test_half_precision_inputs_round_trip_in_model_dtype() -> None:
    """Compressed tokens come back in the dtype of the incoming states (the model's), fp parts stay exact."""
    layer, qk, _ = make_layer(1, 2)
    k, v = kv(1, 12, seed=13)
    layer.update(k.to(torch.bfloat16), v.to(torch.bfloat16))
    rk, rv = layer.update(*(t.to(torch.bfloat16) for t in kv(1, 1, seed=14)))
    assert rk.dtype == rv.dtype == torch.bfloat16
    assert torch.equal(rk[:, :, :1], k[:, :, :1].to(torch.bfloat16))


# -- SpectralKVCache ----------------------------------------------------------------------------------------------


def test_cache_layers_and_overrides(tiny_llama: torch.nn.Module, tiny_llama_calibration: object) -> None:
    cache = SpectralKVCache(tiny_llama, tiny_llama_calibration, bits=4.0, window=3, sink_tokens=1)
    assert len(cache.layers) == tiny_llama.config.num_hidden_layers
    assert all(isinstance(layer, CompressedLayer) for layer in cache.layers)
    assert cache.bits == 4.0 and cache.window == 3 and cache.sink_tokens == 1
    assert cache.is_croppable is False
    assert all(layer.window == 3 and layer.sink_tokens == 1 for layer in cache.layers)
    default = SpectralKVCache(tiny_llama.config, tiny_llama_calibration)
    assert default.bits == tiny_llama_calibration.bits and default.window == tiny_llama_calibration.window
    with pytest.raises(ValueError, match="window"):
        SpectralKVCache(tiny_llama, tiny_llama_calibration, window=-1)
    with pytest.raises(ValueError, match="budget"):
        SpectralKVCache(tiny_llama, tiny_llama_calibration, bits=9)


def test_cache_forward_matches_dynamic_cache_while_nothing_is_compressed(
    tiny_llama: torch.nn.Module, tiny_llama_calibration: object
) -> None:
    """Until tokens leave the window, the compressed cache is exact: logits equal DynamicCache's bit for bit."""
    from transformers import DynamicCache

    ids = torch.randint(2, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama(ids[:, :10], cache=DynamicCache(config=tiny_llama.config))
        ref2 = tiny_llama(ids[:, 10:], cache=ref.cache)
        cache = SpectralKVCache(tiny_llama, tiny_llama_calibration, window=32)
        out = tiny_llama(ids[:, :10], cache=cache)
        out2 = tiny_llama(ids[:, 10:], cache=cache)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out2.logits, ref2.logits)
    assert cache.get_seq_length() == 12
    assert all(isinstance(layer, DynamicLayer) for layer in cache.layers)  # CompressedLayer is a DynamicLayer


# -- left-padded batches ---------------------------------------------------------------------------------------------


def _padded_batch_vs_alone(set_padding: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], CompressedLayer]:
    """Drive a batch layer (row 0 left-padded by 5) and one layer per row alone; return what each returned."""
    sink, window, pad, total = 3, 4, 5, 20
    batch, _, _ = make_layer(sink, window)
    alone = [make_layer(sink, window)[0] for _ in range(2)]
    if set_padding:
        batch.set_left_padding(torch.tensor([pad, 0]))
    rows = [kv(1, total - pad, seed=20), kv(1, total, seed=21)]
    garbage = kv(1, pad, seed=22)
    prefill = [torch.cat([torch.cat([garbage[j], rows[0][j]], 2), rows[1][j]], 0) for j in range(2)]
    got_batch, got_alone = [], []
    steps = [(prefill, rows)] + [
        ((torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])), [a, b])
        for a, b in ((kv(1, 1, seed=30 + s), kv(1, 1, seed=60 + s)) for s in range(8))
    ]
    for (bk, bv), per_row in steps:
        rk, _ = batch.update(bk, bv)
        got_batch.append(rk)
        got_alone.append([alone[i].update(*per_row[i])[0] for i in range(2)])
    return got_batch, got_alone, batch


def test_left_padded_rows_are_cached_as_if_alone() -> None:
    """With the padding declared, each row's returned past equals what that row alone would get (its own sinks
    exact, the rest compressed exactly when it leaves the window); without it, the padded row loses its sinks."""
    got_batch, got_alone, layer = _padded_batch_vs_alone(set_padding=True)
    assert layer.sink_keys.shape[2] == 3 + 5
    for rk, (a, b) in zip(got_batch, got_alone, strict=True):
        torch.testing.assert_close(rk[0:1, :, 5:], a, rtol=0, atol=1e-5)
        torch.testing.assert_close(rk[1:2], b, rtol=0, atol=1e-5)
    # row 1's extra fp-region tokens (positions 3..7) were compressed once they left the window
    assert not torch.equal(layer.sink_keys[1, :, 3:], got_batch[0][1, :, 3:8])
    assert torch.equal(layer.sink_keys[1, :, :3], got_batch[0][1, :, :3])
    undeclared, alone, _ = _padded_batch_vs_alone(set_padding=False)
    assert not torch.allclose(undeclared[-1][0:1, :, 5:], alone[-1][0], atol=1e-3)  # the bug this guards against


def test_left_padding_follows_batch_ops_and_is_validated() -> None:
    layer, _, _ = make_layer(2, 2)
    layer.set_left_padding(torch.tensor([3, 0, 1]))
    layer.update(*kv(3, 12, seed=40))
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    assert layer.left_padding.tolist() == [1, 1, 3]
    layer.batch_repeat_interleave(2)
    assert layer.left_padding.tolist() == [1, 1, 1, 1, 3, 3]
    with pytest.raises(ValueError, match="before the first update"):
        layer.set_left_padding(torch.zeros(6))
    wrong, _, _ = make_layer()
    wrong.set_left_padding(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="batch has 3"):
        wrong.update(*kv(3, 4, seed=41))


def test_left_padding_from_mask() -> None:
    from spectralkv.cache import left_padding

    assert left_padding(torch.ones(2, 5)) is None  # nothing padded: nothing changes
    assert left_padding(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [2, 0]
    assert left_padding(torch.tensor([[1, 1, 0], [1, 0, 0]])) is None  # right padding is not left padding
    assert left_padding(None) is None and left_padding(torch.ones(1, 1, 3, 3)) is None


# -- memory accounting on the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_kv(smollm2: tuple[object, object]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real post-RoPE keys/values of SmolLM2 over 4008 tokens of evaluation text, per layer."""
    from transformers import DynamicCache

    from spectralkv.text import evaluation_tokens

    model, tok = smollm2
    ids = evaluation_tokens(tok)[:4008].view(1, -1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(ids, cache=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2.5, 3.0, 4.0])
def test_memory_report_matches_accounting(smollm2: tuple[object, object], smollm2_calibration: object,
                                          smollm2_kv: list[tuple[torch.Tensor, torch.Tensor]], bits: float) -> None:
    """After 4004 tokens of prefill and 4 decode steps of real keys/values: the bytes the codes and scales really
    occupy are within 5% of what the accounting promises (chunked growth is the only slack), the promise is
    ``calibration.bytes_per_token(bits)`` per compressed token, and that is ``effective_bits`` per coordinate."""
    model, _ = smollm2
    cal = smollm2_calibration.with_bits(bits)
    cache = SpectralKVCache(model, cal)
    prefill = 4004
    for i, (k, v) in enumerate(smollm2_kv):
        cache.update(k[:, :, :prefill], v[:, :, :prefill], i)
    for t in range(prefill, 4008):  # decode steps: each also decodes the whole store
        for i, (k, v) in enumerate(smollm2_kv):
            cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], i)
    r = cache.memory_report()
    n = 4008 - cal.sink_tokens - cal.window
    assert r["seq_length"] == 4008 and r["compressed_tokens"] == n and r["bits"] == bits
    eff = cal.effective_bits()
    assert bits - 0.01 < eff <= bits
    assert cal.bytes_per_token() == pytest.approx(eff * cal.coords_per_token / 8)
    # fixed part (codes, scales, outlier counts) as promised; the outlier entries as stored, within the cap
    compressed = [layer for layer in cache.layers if hasattr(layer, "key_store")]
    entries = sum(layer.key_store.outliers.entries + layer.value_store.outliers.entries for layer in compressed)
    q = next(iter(cal.quantizers().values()))
    expected_entries = cal.outlier_fraction * cal.coords_per_token * n
    fixed = n * (cal.bytes_per_token() - cal.outlier_fraction * cal.coords_per_token * q.outlier_entry_bits / 8)
    assert r["accounted_bytes"] == pytest.approx(fixed + entries * q.outlier_entry_bits / 8, rel=1e-9)
    if cal.outlier_threshold is not None:
        assert 0 < entries <= (cal.outlier_cap or 0) * n * 2 * len(compressed)
        assert entries >= 0.5 * expected_entries  # held-out text beyond the calibration's positions: more, not fewer
    resident = r["compressed_resident_bytes"]
    assert r["codes_bytes"] + r["metadata_bytes"] == resident
    assert r["accounted_bytes"] <= resident <= 1.05 * r["accounted_bytes"] + 2 * 1024 * 3 * len(compressed) * 2
    assert (r["metadata_bytes"] > 0) == (cal.token_scale or cal.outlier_threshold is not None)
    cfg = model.config
    layers, heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    assert r["fp16_bytes"] == 4008 * layers * heads * head_dim * 2 * 2
    fp_parts = (cal.sink_tokens + cal.window) * layers * heads * head_dim * 2 * 4  # float32 model
    assert r["sinks_bytes"] + r["window_bytes"] == fp_parts and r["other_layers_bytes"] == 0
    assert r["resident_bytes"] == resident + fp_parts
    assert r["saved_fraction"] == pytest.approx(1 - r["resident_bytes"] / r["fp16_bytes"])
    measured_bits = r["accounted_bytes"] * 8 / (n * cal.coords_per_token)  # codes + scales + outliers as stored
    assert r["saved_fraction"] > 1 - 1.05 * measured_bits / 16 - 0.02
    per_layer = r["per_layer"]
    assert len(per_layer) == layers and sum(p["codes"] for p in per_layer) == r["codes_bytes"]
