"""Calibration: measure a model's keys, values and queries, and turn them into a :class:`SpectralKVConfig`.

1. Fit pass (streaming, constant memory): per layer and KV head, float64 moments of keys and values exactly as the
   cache stores them (post-RoPE), skipping the first ``sink_tokens`` of each sequence, plus the second moment of the
   queries of the head's GQA group; a small random sample of raw vectors is kept for fitting codebooks.
2. Eigenbases of the centred covariances; importance weights per eigen-coordinate: ``u^T E[q q^T] u`` for keys
   (the score error of a key error ``e`` is ``q.e``) and ``u^T W_o^T W_o u`` for values (a value error reaches the
   residual stream through ``o_proj``).
3. Lloyd-Max codebooks per layer and K/V, fitted to the calibration coordinates, with and without a per-token scale.
4. Held-out pass: measured codebook distortion per coordinate and bit width; then the choices papers disagree on
   (relative weight of key vs value errors, per-token scale on/off, which outliers to keep exactly at what cost)
   are made by fake-quantizing the held-out keys and values at the target budget and measuring the attention
   output error after ``o_proj``, with each query seeing its last ``window`` tokens exactly, as the cache serves
   them (on SmolLM2 this alone cut the perplexity loss from +11.4% to +5.4% at 2 bits and +4.6% to +2.7% at 2.5:
   quantizing the recent tokens, where attention concentrates, measured errors serving never makes). With an
   outlier threshold, codebooks are fitted to the coordinates inside it and the bits the outliers cost (measured on
   held-out text) are taken from the codes, so the budget holds all-in.
5. Budget profiles: at each of ``profile_budgets`` the per-layer K/V weights and the key weight are fitted again
   (same scale mode, threshold and codebooks) and kept where they lower the held-out error at that budget, so
   ``bits=`` serves other budgets with weights measured near them, not only those of the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .allocation import allocate, check_budget
from .capture import capture_attention
from .codebook import distortion_table, fit_codebooks
from .config import KINDS, ROPE_FREQUENCIES, SCALE_RANGE, SpectralKVConfig, check_head_group, tensor_name
from .fingerprint import check_supported, compressed_layers, fingerprint
from .moments import MomentAccumulator, eigh_descending, participation_ratio
from .positions import AUTO, PositionMoments, position_features, resolve_position_centring
from .positions import rotate as rope_rotate
from .scales import FP16, LOG8_BITS, ScaleCodec, check_scale_format, measured_range
from .sensitivity import attention_output_gradients, fisher_error
from .served_attention import served_attention
from .text import calibration_tokens, windows

KEY_WEIGHT_GRID = tuple(2.0**e for e in range(-6, 7))
OUTLIER_THRESHOLDS: tuple[float | None, ...] = (None, 4.0, 3.5, 3.0)  # standard deviations; None: no outliers
PROFILE_BUDGETS: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0)  # budgets whose weights are re-fitted (the default's too)
SAMPLES_PER_SEQUENCE = 64
MAX_CODEBOOK_SAMPLES = 1 << 17


@dataclass
class _Choice:
    error: float
    config: SpectralKVConfig
    per_layer: list[float]
    multipliers: dict[tuple[int, str], float]
    key_weight: float


@dataclass
class _Heldout:
    q: torch.Tensor  # [S, Hq, T, D]
    k: torch.Tensor  # [S, H, T, D]
    v: torch.Tensor
    scaling: float
    w_o: torch.Tensor | None  # [hidden, Hq * D]
    ref: torch.Tensor  # exact attention outputs [S, T, hidden]: every candidate the search measures compares to them


def _o_proj_weight(module: torch.nn.Module) -> torch.Tensor | None:
    proj = getattr(module, "o_proj", None)
    w = getattr(proj, "weight", None)
    return None if w is None else w.detach().float().cpu()


def _run(model: Any, seqs: list[torch.Tensor], callback: Any, desc: str, progress: bool) -> None:
    device = next(model.parameters()).device
    with torch.inference_mode(), capture_attention(model, callback):
        for ids in tqdm(seqs, desc=desc, disable=not progress, unit="seq"):
            model(input_ids=ids.view(1, -1).to(device), use_cache=False)


def _to_bases(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[H, N, D]`` per KV head -> ``[H / group, N, group * D]``: each row holds ``group`` heads side by side."""
    if group == 1:
        return x
    h, n, d = x.shape
    return x.transpose(0, 1).reshape(n, h // group, group * d).transpose(0, 1)


def _block_diagonal(m: torch.Tensor, group: int) -> torch.Tensor:
    """``[H, D, D]`` per-head matrices -> ``[H / group, group * D, group * D]`` block-diagonal ones (a quadratic form
    per head, e.g. the score error of each head's queries, seen in a basis shared by ``group`` heads)."""
    if group == 1:
        return m
    return torch.stack([torch.block_diag(*m[i : i + group]) for i in range(0, m.shape[0], group)])


def _standardise(x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``[H, N, D]`` raw -> rotated, centred, standardised ``z``."""
    return torch.einsum("hnd,hde->hne", x.float() - mean[:, None].float(), basis.float()) / lam.float().clamp_min(
        1e-10
    ).sqrt()[:, None]


def _token_scaled(z: torch.Tensor, codec: ScaleCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """``z`` divided by its per-token scale as stored (rounded to the codec's levels), and that scale."""
    s = codec.quantized(z.pow(2).mean(-1, keepdim=True))
    return z / s, s


def _output(o: torch.Tensor, w_o: torch.Tensor | None) -> torch.Tensor:
    """``[S, Hq, T, D]`` attention -> ``[S, T, hidden]`` outputs, through ``o_proj`` when known."""
    o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
    return o if w_o is None else o @ w_o.T


def exact_attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                           w_o: torch.Tensor | None) -> torch.Tensor:
    """Causal attention outputs with exact K/V (after ``o_proj`` when known), ``[S, T, hidden]``: the reference
    :func:`attention_output_delta` measures against."""
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    return _output(o, w_o)


def attention_output_delta(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_hat: torch.Tensor, v_hat: torch.Tensor,
    scaling: float, w_o: torch.Tensor | None, window: int = 0, ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Change of causal attention outputs (after ``o_proj`` when known), ``[S, T, hidden]``, with quantized K/V,
    and its relative squared size.

    ``window``: each query sees its last ``window`` tokens exactly, as the cache serves them (the recent window is
    where attention concentrates, so quantizing it would measure errors that serving never makes). ``ref``: the
    exact outputs (:func:`exact_attention_output`) when already known; the search reuses them for every candidate."""
    if ref is None:
        ref = exact_attention_output(q, k, v, scaling, w_o)
    dy = _output(served_attention(q, k, v, k_hat, v_hat, scaling, window), w_o) - ref
    return dy, float(dy.pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))


def calibrate(
    model: Any,
    tokenizer: Any,
    *,
    bits: float = 3.0,
    text: str = "pydoc",
    tokens: int = 32768,
    heldout_tokens: int = 2048,
    seq_len: int = 2048,
    sink_tokens: int = 4,
    window: int = 32,
    seed: int = 0,
    progress: bool = True,
    base_model: str | None = None,
    base_model_revision: str | None = None,
    weighting: str = "fisher",
    outlier_thresholds: tuple[float | None, ...] = OUTLIER_THRESHOLDS,
    profile_budgets: tuple[float, ...] = PROFILE_BUDGETS,
    position_centring: str | None = AUTO,
    scale_format: str = "log8",
    head_group: int = 1,
) -> SpectralKVConfig:
    """Calibrate ``model`` on ``text`` and return a config serving budget ``bits`` (and any other budget).

    ``weighting="fisher"`` (default) weights each layer's key and value errors by their measured effect on the
    next-token loss (gradients on held-out text); ``"output"`` by relative attention-output error only.
    ``seq_len``: tokens per calibration sequence. Post-RoPE key statistics depend on position, so sequences as long
    as the contexts served matter: on SmolLM2, 2048 instead of 512 (same tokens) cut the 4-bit perplexity loss from
    +0.49% to +0.30%, +2.4% to +2.0% at 3 bits, and kept the exact outliers within their reserved share.
    ``outlier_thresholds``: candidates for the exact-outlier threshold (None: none); the held-out error at the
    budget, outliers paid for, picks one.
    ``sink_tokens`` / ``window``: the full-precision layout the calibration is made for (the default a cache serves
    it with); the held-out error keeps exactly these tokens exact, so every choice is made for how it is served.
    ``profile_budgets``: other budgets to re-fit the per-layer K/V weights and the key weight at (the scale mode,
    outlier threshold and codebooks stay those chosen at ``bits``); a budget's profile is kept only where it lowers
    the held-out error at that budget, and ``bits=`` then serves the nearest calibrated budget's weights.
    ``position_centring``: ``"rope"`` centres each key on the pre-RoPE key mean rotated to its position (see
    :mod:`spectralkv.positions`; the basis, codebooks and allocation then describe the residual), None on its
    post-RoPE mean; ``"auto"`` (default) is ``"rope"`` wherever the model's rotary embedding allows it. On SmolLM2
    it changed nothing measurable at a 512-token prefill and cut the perplexity loss at a 4096-token prefill (twice
    the calibration's sequences) from +17.1 / +7.4 / +4.3% to +7.4 / +1.5 / +0.33% at 2 / 3 / 4 bits.
    ``scale_format``: how a per-token scale, where the search picks one, is stored (:mod:`spectralkv.scales`):
    ``"log8"`` (default), one byte over the log2 range the calibration's tokens span plus an octave each side, or
    ``"fp16"``. The byte costs half as much, and its rounding is far below what the codes lose; on SmolLM2 the freed
    bits cut the perplexity loss at 2 bits from +5.1% to +4.1% (paired -1.0%), within noise at 2.5-4 bits
    (docs/experiments.md).
    ``head_group``: KV heads coded in one basis (a divisor of the model's KV heads; 1: a basis per head). Keys and
    values of one layer's heads are projections of the same hidden state, so a joint basis captures their
    correlations; on SmolLM2 (3 KV heads) one basis per layer cut the held-out error by 41-50% at 2-4 bits
    (docs/experiments.md). The fused decode kernels read per-head bases only, so such a calibration serves the
    dequantizing cache path.
    """
    bits = check_budget(bits)
    check_scale_format(scale_format)
    try:
        profile_budgets = tuple(sorted({check_budget(b) for b in profile_budgets} - {bits}))
    except ValueError as e:
        raise ValueError(f"`profile_budgets` {tuple(profile_budgets)!r}: {e}") from None
    if not outlier_thresholds or any(t is not None and not t > 0 for t in outlier_thresholds):
        raise ValueError(f"`outlier_thresholds` must be a non-empty sequence of positive numbers or None, got "
                         f"{outlier_thresholds!r}.")
    if weighting not in ("fisher", "output"):
        raise ValueError(f"`weighting` must be 'fisher' or 'output', got {weighting!r}.")
    check_supported(model)
    if window < 0 or sink_tokens < 0:
        raise ValueError(f"`window` and `sink_tokens` must be >= 0 (the full-precision layout the calibration is "
                         f"made for), got {window} and {sink_tokens}.")
    if seq_len <= sink_tokens:
        raise ValueError(f"`seq_len` ({seq_len}) must exceed `sink_tokens` ({sink_tokens}).")
    if tokens < seq_len or heldout_tokens < seq_len:
        raise ValueError(f"`tokens` ({tokens}) and `heldout_tokens` ({heldout_tokens}) must be >= seq_len ({seq_len}).")
    fp = fingerprint(model)
    layers = compressed_layers(fp)
    if not layers:
        raise ValueError(
            "Every layer of this model is a sliding-window layer; spectralkv keeps those windows in full precision "
            "(their memory is bounded by the window), so there is nothing to compress."
        )
    h, hq, d = fp["num_key_value_heads"], fp["num_attention_heads"], fp["head_dim"]
    g = check_head_group(head_group, h)
    hb, db = h // g, g * d  # bases per layer and their dimension
    ids = calibration_tokens(tokenizer, text)
    if len(ids) < tokens + heldout_tokens:
        raise ValueError(
            f"The calibration text {text!r} has {len(ids)} tokens, but tokens + heldout_tokens = "
            f"{tokens + heldout_tokens} were requested. Lower --tokens or pass a longer --text file."
        )
    fit_seqs = windows(ids[:tokens], seq_len)
    held_seqs = windows(ids[len(ids) - heldout_tokens :], seq_len)
    gen = torch.Generator().manual_seed(seed)
    layer_set = set(layers)

    position_centring, freqs = resolve_position_centring(model, position_centring, d)
    # 1. fit pass -----------------------------------------------------------------------------------------------
    mom = {(l, k): MomentAccumulator(hb, db) for l in layers for k in KINDS if not (freqs is not None and k == "k")}
    pos_mom = {l: PositionMoments(hb, db, freqs, block=d) for l in layers} if freqs is not None else {}
    sample_positions: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    qmom = {l: MomentAccumulator(h, d) for l in layers}
    samples: dict[tuple[int, str], list[torch.Tensor]] = {(l, k): [] for l in layers for k in KINDS}
    w_o: dict[int, torch.Tensor | None] = {}
    scaling: dict[int, float] = {}

    def fit_cb(l: int, module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if l not in layer_set:
            return
        if l not in w_o:
            w_o[l] = _o_proj_weight(module)
            scaling[l] = float(getattr(module, "scaling", d**-0.5))
        pick = torch.randperm(k.shape[2] - sink_tokens, generator=gen)[:SAMPLES_PER_SEQUENCE] + sink_tokens
        sample_positions[l].append(pick)  # calibration sequences start at position 0
        for kind, x in (("k", k), ("v", v)):
            xs = _to_bases(x[0, :, sink_tokens:].float(), g)
            if (l, kind) in mom:
                mom[(l, kind)].update(xs)
            else:
                pos_mom[l].update(xs, torch.arange(sink_tokens, x.shape[2]))
            samples[(l, kind)].append(x[0, :, pick].float().cpu())
        gq = hq // h
        qs = q[0, :, sink_tokens:].float().reshape(h, gq, -1, d).reshape(h, -1, d)  # query j uses KV head j // gq
        qmom[l].update(qs)

    _run(model, fit_seqs, fit_cb, "calibration: moments", progress)

    # 2. eigenbases and importance weights -------------------------------------------------------------------------
    tensors: dict[str, torch.Tensor] = {}
    measured_layers = []
    for l in layers:
        row: dict[str, Any] = {"layer": l}
        for kind in KINDS:
            if (l, kind) in mom:
                m = mom[(l, kind)]
                cov, mu = m.covariance(), m.mean()
                raw_mean, energy = mu, m.second_moment().diagonal(dim1=-2, dim2=-1).sum(-1)
            else:
                pm = pos_mom[l]
                position_mean, mu, cov = pm.residual()
                tensors[tensor_name(l, kind, "position_mean")] = position_mean.float().reshape(h, d)
                raw_mean, energy = pm.raw_mean(), pm.raw_second_moment_trace()
                # share of the key energy the per-position centre removes (the mean alone removes k_mean_energy)
                row[f"{kind}_centre_energy"] = float((1 - cov.diagonal(dim1=-2, dim2=-1).sum(-1)
                                                      / energy.clamp_min(1e-30)).mean())
            lam, vec = eigh_descending(cov)
            if kind == "k":
                qq = qmom[l].second_moment() * (hq // h)  # summed over the query heads of the group
                weight = torch.einsum("hdi,hde,hei->hi", vec, _block_diagonal(qq, g), vec)
            else:
                wo = w_o.get(l)
                if wo is None:
                    weight = torch.ones(hb, db, dtype=torch.float64)
                else:
                    blocks = wo.double().view(wo.shape[0], h, hq // h, d)
                    mh = torch.einsum("ohgd,ohge->hde", blocks, blocks)
                    weight = torch.einsum("hdi,hde,hei->hi", vec, _block_diagonal(mh, g), vec)
            tensors[tensor_name(l, kind, "mean")] = mu.float()
            tensors[tensor_name(l, kind, "basis")] = vec.float()
            tensors[tensor_name(l, kind, "eigenvalues")] = lam.float()
            tensors[tensor_name(l, kind, "weights")] = weight.clamp_min(0).float()
            row[f"{kind}_mean_energy"] = float((raw_mean.pow(2).sum(-1) / energy.clamp_min(1e-30)).mean())
            row[f"{kind}_participation_ratio"] = float(participation_ratio(lam).mean())
            row[f"{kind}_top8_energy"] = float((lam[:, :8].sum(-1) / lam.sum(-1).clamp_min(1e-30)).mean())
        measured_layers.append(row)
    # Put key and value weights on one scale (equal total weighted variance); the data then picks the ratio.
    tot = {kind: sum(float((tensors[tensor_name(l, kind, "weights")].double()
                            * tensors[tensor_name(l, kind, "eigenvalues")].double()).sum()) for l in layers)
           for kind in KINDS}
    norm = tot["v"] / max(tot["k"], 1e-30)
    for l in layers:
        tensors[tensor_name(l, "k", "weights")] *= norm
    if freqs is not None:
        tensors[ROPE_FREQUENCIES] = freqs

    def uncentred(l: int, kind: str, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., H, N, D]`` at ``positions`` ``[N]`` less its per-position centre term ``R_p m`` (keys of a
        position-centred calibration; otherwise ``x``), ready for :func:`_standardise` with the mean."""
        if freqs is None or kind != "k":
            return x
        cos, sin = position_features(positions, freqs)
        return x - rope_rotate(tensors[tensor_name(l, kind, "position_mean")][:, None, :], cos, sin)

    # 3. held-out pass ---------------------------------------------------------------------------------------------
    held: dict[int, dict[str, list[torch.Tensor]]] = {l: {"q": [], "k": [], "v": []} for l in layers}

    def held_cb(l: int, module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if l in layer_set:
            for name, x in (("q", q), ("k", k), ("v", v)):
                held[l][name].append(x.float().cpu())

    _run(model, held_seqs, held_cb, "calibration: held-out", progress)
    heldout: dict[int, _Heldout] = {}
    for l in layers:
        q, k, v = (torch.cat(held[l][name]) for name in ("q", "k", "v"))
        heldout[l] = _Heldout(q, k, v, scaling[l], w_o[l], exact_attention_output(q, k, v, scaling[l], w_o[l]))

    # 4. codebooks and measured distortion, per scale mode and outlier threshold ------------------------------------
    variants: dict[tuple[bool, float | None], dict[str, Any]] = {}
    for token_scale in (False, True):
        for thr in outlier_thresholds:
            variants[(token_scale, thr)] = {"codebooks": {}, "distortion": {}, "outliers": 0, "coords": 0}
        for l in layers:
            for kind in KINDS:
                mean = tensors[tensor_name(l, kind, "mean")]
                basis = tensors[tensor_name(l, kind, "basis")]
                lam = tensors[tensor_name(l, kind, "eigenvalues")]
                fit_x = uncentred(l, kind, torch.cat(samples[(l, kind)], 1), torch.cat(sample_positions[l]))
                z_fit = _standardise(_to_bases(fit_x, g), mean, basis, lam)
                x_held = getattr(heldout[l], kind)[:, :, sink_tokens:]
                x_held = uncentred(l, kind, x_held, torch.arange(sink_tokens, sink_tokens + x_held.shape[2]))
                x_held = _to_bases(x_held.transpose(0, 1).reshape(h, -1, d), g)
                z_held = _standardise(x_held, mean, basis, lam)
                scale = None
                range_name = tensor_name(l, kind, SCALE_RANGE)
                if scale_format == "log8" and range_name not in tensors:  # what the fitting tokens' scales span
                    tensors[range_name] = measured_range(z_fit.pow(2).mean(-1).sqrt())
                if token_scale:
                    codec = FP16 if scale_format == "fp16" else ScaleCodec(
                        "log8", tuple(tensors[range_name].tolist()))
                    z_fit, _ = _token_scaled(z_fit, codec)
                    z_held, scale = _token_scaled(z_held, codec)
                flat_all = z_fit.reshape(-1)
                for thr in outlier_thresholds:
                    var = variants[(token_scale, thr)]
                    flat = flat_all if thr is None else flat_all[flat_all.abs() <= thr]
                    if flat.numel() > MAX_CODEBOOK_SAMPLES:
                        flat = flat[torch.randperm(flat.numel(), generator=gen)[:MAX_CODEBOOK_SAMPLES]]
                    table = fit_codebooks(flat)
                    var["codebooks"][(l, kind)] = table
                    var["distortion"][(l, kind)] = distortion_table(z_held, table, scale, exact_beyond=thr)
                    if thr is not None:
                        var["outliers"] += int((z_held.abs() > thr).sum())
                    var["coords"] += z_held.numel()

    # 5. per-layer K and V weights, scale mode and K/V balance, chosen by measured error at the target budget ---------
    grads = attention_output_gradients(model, held_seqs, layers, progress) if weighting == "fisher" else {}

    def build(token_scale: bool, multipliers: dict[tuple[int, str], float], key_weight: float,
              threshold: float | None, budget: float) -> SpectralKVConfig:
        var = variants[(token_scale, threshold)]
        t = dict(tensors)
        for l in layers:
            for kind in KINDS:
                t[tensor_name(l, kind, "codebooks")] = var["codebooks"][(l, kind)]
                t[tensor_name(l, kind, "distortion")] = var["distortion"][(l, kind)].float()
                mult = multipliers.get((l, kind), 1.0) * (key_weight if kind == "k" else 1.0)
                t[tensor_name(l, kind, "weights")] = tensors[tensor_name(l, kind, "weights")] * mult
                t[tensor_name(l, kind, "bits")] = torch.zeros(hb, db, dtype=torch.uint8)
        cfg = SpectralKVConfig(
            base_model=base_model or getattr(model.config, "spectralkv_base_model", None)
            or str(getattr(model.config, "_name_or_path", "unknown")),
            fingerprint=fp, compressed_layers=layers, tensors=t, default_bits=budget, token_scale=token_scale,
            scale_format=scale_format,
            key_weight=key_weight, outlier_threshold=threshold,
            outlier_fraction=var["outliers"] / max(var["coords"], 1), sink_tokens=sink_tokens, window=window,
            position_centring=position_centring, head_group=g,
            base_model_revision=base_model_revision,
        )
        alloc = allocate(cfg.weighted_distortion(), cfg.code_bits_for(budget), cfg.group_size)
        for (l, kind), b in alloc.items():
            t[tensor_name(l, kind, "bits")] = b
        return cfg

    def layer_error(cfg: SpectralKVConfig, quant: dict, l: int, kinds: tuple[str, ...]) -> tuple[float, float]:
        """(loss-weighted error, relative output error) of layer ``l`` with ``kinds`` quantized."""
        ho = heldout[l]
        hat = {"k": ho.k, "v": ho.v}
        for kind in kinds:
            x = getattr(ho, kind)
            xh = quant[(l, kind)].fake_quantize(x, positions=torch.arange(x.shape[2]))
            xh[:, :, :sink_tokens] = x[:, :, :sink_tokens]
            hat[kind] = xh
        dy, rel = attention_output_delta(ho.q, ho.k, ho.v, hat["k"], hat["v"], ho.scaling, ho.w_o, window, ho.ref)
        loss_err = fisher_error(grads[l], dy) if grads else rel
        return loss_err, rel

    def heldout_error(cfg: SpectralKVConfig) -> tuple[float, list[float]]:
        quant = cfg.quantizers()
        errs = [layer_error(cfg, quant, l, KINDS) for l in layers]
        return float(sum(e[0] for e in errs)), [e[1] for e in errs]

    def fit_multipliers(token_scale: bool, threshold: float | None, budget: float,
                        rounds: int = 2) -> dict[tuple[int, str], float]:
        """Per (layer, kind) factor turning the static weights into measured loss-weighted error per unit of
        predicted distortion (measured with only that layer's keys, or values, quantized)."""
        mult: dict[tuple[int, str], float] = {}
        for _ in range(rounds):
            cfg = build(token_scale, mult, 1.0, threshold, budget)
            quant = cfg.quantizers()
            wd = cfg.weighted_distortion()
            alloc = cfg.allocation()
            for l in layers:
                for kind in KINDS:
                    b = alloc[(l, kind)].long().unsqueeze(-1)
                    predicted = float(torch.gather(wd[(l, kind)], -1, b).sum())
                    measured = layer_error(cfg, quant, l, (kind,))[0]
                    old = mult.get((l, kind), 1.0)
                    mult[(l, kind)] = old * (measured + 1e-30) / (predicted + 1e-30) if predicted > 0 else old
        return mult

    def search(budget: float, options: list[tuple[bool, float | None]], desc: str) -> tuple[_Choice, list[dict]]:
        """The option (scale mode, outlier threshold), per-layer multipliers and key weight with the least held-out
        error at ``budget``, and one row per candidate measured."""
        rows: list[dict[str, Any]] = []
        best: _Choice | None = None
        grid = KEY_WEIGHT_GRID if weighting == "output" else (0.5, 1.0, 2.0)
        for ts, thr in tqdm(options, desc=desc, disable=not progress):
            try:
                mult = fit_multipliers(ts, thr, budget) if weighting == "fisher" else {}
            except ValueError:  # the scales and outliers alone exceed the budget: not an option at this budget
                continue
            for kw in grid:
                cfg = build(ts, mult, kw, thr, budget)
                err, per_layer = heldout_error(cfg)
                rows.append({"token_scale": ts, "outlier_threshold": thr, "outlier_fraction": cfg.outlier_fraction,
                             "key_weight": kw, "heldout_error": err,
                             "mean_relative_output_error": sum(per_layer) / len(per_layer), **cfg.kv_split()})
                if best is None or err < best.error:
                    best = _Choice(err, cfg, per_layer, mult, kw)
        if best is None:
            raise RuntimeError("No allocation could be evaluated; this is a bug, please report it.")
        return best, rows

    scale_bits = FP16.bits if scale_format == "fp16" else LOG8_BITS
    modes = [ts for ts in (False, True) if not (ts and bits * db <= scale_bits)]  # skip scales that eat the budget
    chosen, search_rows = search(bits, [(ts, thr) for ts in modes for thr in outlier_thresholds],
                                 "calibration: allocation search")
    profiles, profile_rows = [], []
    for b in tqdm(profile_budgets, desc="calibration: budget profiles", disable=not progress):
        if b < chosen.config.min_bits:
            profile_rows.append({"bits": b, "skipped": "below the budget the scales and outliers alone cost"})
            continue
        base_err = heldout_error(chosen.config.with_bits(b))[0]
        alt, _ = search(b, [(chosen.config.token_scale, chosen.config.outlier_threshold)], f"profile {b:g} bits")
        keep = alt.error < base_err
        profile_rows.append({"bits": b, "heldout_error_default_weights": base_err, "heldout_error_profile": alt.error,
                             "key_weight": alt.key_weight, "kept": keep, **alt.config.kv_split()})
        if keep:
            factors = [[alt.multipliers.get((l, kind), 1.0) * (alt.key_weight if kind == "k" else 1.0)
                        / (chosen.multipliers.get((l, kind), 1.0) * (chosen.key_weight if kind == "k" else 1.0))
                        for kind in KINDS] for l in layers]
            profiles.append({"bits": b, "factors": factors})
    err, cfg, per_layer = chosen.error, chosen.config.with_weight_profiles(profiles), chosen.per_layer
    for row, e in zip(measured_layers, per_layer, strict=True):
        row["heldout_output_error"] = e
    cfg.calibration = {
        "text_source": text,
        "tokens": len(fit_seqs) * seq_len,
        "heldout_tokens": len(held_seqs) * seq_len,
        "seq_len": seq_len,
        "sink_tokens": sink_tokens,
        "seed": seed,
        "codebook_granularity": "per layer and K/V",
        "weighting": weighting,
        "position_centring": position_centring,
        "spectralkv_version": __version__,
    }
    fp16_bytes = 2 * 2 * len(layers) * h * d
    cfg.measured = {
        "layers": measured_layers,
        "kv_split_search": search_rows,
        "budget_profiles": profile_rows,
        "chosen": {"token_scale": cfg.token_scale, "scale_format": cfg.scale_format, "key_weight": cfg.key_weight,
                   "heldout_error": err,
                   "outlier_threshold": cfg.outlier_threshold, "outlier_fraction": cfg.outlier_fraction,
                   "weighting": weighting, "mean_relative_output_error": sum(per_layer) / len(per_layer),
                   **cfg.kv_split()},
        "bytes_per_token": cfg.bytes_per_token(),
        "fp16_bytes_per_token": fp16_bytes,
        "effective_bits": cfg.effective_bits(),
    }
    if not math.isfinite(err):
        raise RuntimeError("Calibration produced a non-finite held-out error; the model's activations may overflow.")
    return cfg
