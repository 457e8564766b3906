"""Summaries and plots of a calibration: spectra, bit allocation, K/V split (CLI `inspect` and the Space)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .card import bases_text
from .config import SpectralKVConfig


def summary_rows(config: SpectralKVConfig, bits: float | None = None) -> list[dict[str, Any]]:
    """One row per compressed layer: participation ratios, mean energy, bits chosen for K and V."""
    alloc = config.allocation(bits)
    measured = {r["layer"]: r for r in config.measured.get("layers", [])}
    rows = []
    for l in config.compressed_layers:
        m = measured.get(l, {})
        rows.append({
            "layer": l,
            "key_pr": m.get("k_participation_ratio", float("nan")),
            "value_pr": m.get("v_participation_ratio", float("nan")),
            "key_mean_energy": m.get("k_mean_energy", float("nan")),
            "key_bits": float(alloc[(l, "k")].double().mean()),
            "value_bits": float(alloc[(l, "v")].double().mean()),
            "heldout_error": m.get("heldout_output_error", float("nan")),
        })
    return rows


def summary_text(config: SpectralKVConfig, bits: float | None = None) -> str:
    """A plain-text report for terminals."""
    b = config.bits if bits is None else bits
    split = config.kv_split(b)
    fp16 = 2 * config.coords_per_token
    refitted = ", ".join(f"{p['bits']:g}" for p in config.weight_profiles)
    lines = [
        f"spectralkv calibration for {config.base_model}",
        f"  layers compressed: {len(config.compressed_layers)} of {config.fingerprint['num_hidden_layers']}, "
        f"{config.num_kv_heads} KV heads x head_dim {config.head_dim}",
        f"  budget {b:g} bits/coord -> stored {config.effective_bits(b):.3f} bits/coord "
        f"(keys {split['key_bits']:.2f}, values {split['value_bits']:.2f} code bits; "
        f"per-token scale: {_scale_text(config)}, key weight {config.key_weight:g}, outliers: "
        f"{'off' if config.outlier_threshold is None else f'>{config.outlier_threshold:g} std'})",
        f"  bytes per token: {config.bytes_per_token(b):.0f} compressed vs {fp16} fp16 "
        f"({fp16 / config.bytes_per_token(b):.1f}x smaller); sinks {config.sink_tokens}, window {config.window}",
        f"  weights re-fitted at: {refitted or 'none'} "
        f"(besides the default {config.default_bits:g}); {b:g} bits uses those of {config.profile_bits(b):g}",
        f"  bases: {bases_text(config)}",
        "  keys centred on: " + ("their post-RoPE mean" if config.position_centring is None else
                                 "the pre-RoPE mean rotated to each key's position (position_centring='rope')"),
        "",
        f"  {'layer':>5} {'K PR':>6} {'V PR':>6} {'K mean%':>8} {'K bits':>7} {'V bits':>7} {'held-out err':>13}",
    ]
    for r in summary_rows(config, b):
        lines.append(
            f"  {r['layer']:>5} {r['key_pr']:>6.1f} {r['value_pr']:>6.1f} {100 * r['key_mean_energy']:>7.0f}% "
            f"{r['key_bits']:>7.2f} {r['value_bits']:>7.2f} {r['heldout_error']:>13.2e}"
        )
    return "\n".join(lines)


def plot_calibration(config: SpectralKVConfig, path: str | Path, bits: float | None = None) -> Path:
    """PNG with eigenvalue spectra of K and V per layer and the bits heatmap (layers x coordinates, head-averaged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alloc = config.allocation(bits)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    cmap = plt.get_cmap("viridis")
    n = len(config.compressed_layers)
    for col, (kind, name) in enumerate((("k", "keys"), ("v", "values"))):
        ax = axes[0, col]
        for i, l in enumerate(config.compressed_layers):
            lam = config.tensor(l, kind, "eigenvalues").double().mean(0)
            ax.semilogy((lam / lam.sum()).clamp_min(1e-8).numpy(), color=cmap(i / max(1, n - 1)), lw=0.9)
        ax.set_title(f"{name}: centred eigenvalue spectrum per layer (normalised, head mean)")
        ax.set_xlabel("eigen-coordinate")
        ax.set_ylabel("fraction of variance")
        ax = axes[1, col]
        grid = torch.stack([alloc[(l, kind)].double().mean(0) for l in config.compressed_layers]).numpy()
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=8, interpolation="nearest")
        ax.set_title(f"{name}: bits per eigen-coordinate (head mean)")
        ax.set_xlabel("eigen-coordinate (largest variance first)")
        ax.set_ylabel("layer")
        ax.set_yticks(range(n), [str(l) for l in config.compressed_layers], fontsize=6)
        fig.colorbar(im, ax=ax, label="bits")
    split = config.kv_split(bits)
    fig.suptitle(
        f"{config.base_model} — {config.bits if bits is None else bits:g} bits/coord "
        f"(keys {split['key_bits']:.2f}, values {split['value_bits']:.2f})"
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _scale_text(config: SpectralKVConfig) -> str:
    return f"yes ({config.scale_format})" if config.token_scale else "no"
