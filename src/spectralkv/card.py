"""Render a calibration's Hub model card from the template in ``hub_cards/``.

The YAML metadata is what the Hub indexes: ``library_name: spectralkv``, ``base_model`` (+ ``base_model_relation``)
so the calibration appears in the base model's model tree and in ``spectralkv list --base-model``, tags, and, when a
quick evaluation was run (:mod:`spectralkv.publish`), a ``model-index`` with the measured perplexity per budget. A
base model given as a local path is left out of the metadata (the Hub rejects it) and the card says so.
"""

from __future__ import annotations

import math
import os
from importlib.resources import files
from pathlib import Path
from typing import Any

TEMPLATE = "calibration_card.md"
TAGS = ("spectralkv", "kv-cache", "quantization")


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hub repo id rather than a local path (the Hub rejects paths in ``base_model``)."""
    if not name or name.startswith((".", "/", "~")) or "\\" in name or os.path.isabs(name):
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists()


def _eval_dataset(evaluation: dict[str, Any]) -> tuple[str, str]:
    text = evaluation.get("text", "pydoc")
    if text == "pydoc":
        return "pydoc_data.topics", "Python standard library pydoc_data.topics (held-out half)"
    return Path(text).name, f"{Path(text).name} (held-out half)"


def eval_results(evaluation: dict[str, Any] | None) -> list[Any]:
    """``model-index`` entries (huggingface_hub ``EvalResult``) for a quick evaluation's rows."""
    from huggingface_hub import EvalResult

    if not evaluation:
        return []
    dataset_type, dataset_name = _eval_dataset(evaluation)
    common = dict(task_type="text-generation", task_name="Streaming perplexity with a compressed KV cache",
                  dataset_type=dataset_type, dataset_name=dataset_name, dataset_split="held-out")
    out = []
    ref = evaluation.get("reference_ppl")
    if isinstance(ref, (int, float)) and math.isfinite(ref):
        out.append(EvalResult(metric_type="perplexity", metric_value=round(ref, 4),
                              metric_name="perplexity, fp16 cache (reference)", **common))
    for row in evaluation.get("budgets", []):
        b = f"{row['bits']:g} bits/coordinate"
        out.append(EvalResult(metric_type="perplexity", metric_value=round(row["ppl"], 4),
                              metric_name=f"perplexity @ {b}", **common))
        out.append(EvalResult(metric_type="delta_perplexity", metric_value=round(row["dppl_pct"], 4),
                              metric_name=f"dPPL vs fp16 cache (%) @ {b}", **common))
        out.append(EvalResult(metric_type="bytes_per_token", metric_value=round(row["bytes_per_token"], 1),
                              metric_name=f"KV bytes per token (compressed layers) @ {b}", **common))
    return out


def card_metadata(config: Any, repo_id: str | None = None, evaluation: dict[str, Any] | None = None) -> Any:
    from huggingface_hub import ModelCardData

    linked = is_hub_id(config.base_model)
    results = eval_results(evaluation)
    return ModelCardData(
        library_name="spectralkv",
        base_model=config.base_model if linked else None,
        base_model_relation="adapter" if linked else None,
        tags=[*TAGS, f"{config.default_bits:g}-bit"],
        license=None,
        eval_results=results or None,
        model_name=(repo_id or f"spectralkv calibration for {config.base_model}") if results else None,
    )


def _evaluation_rows(config: Any, evaluation: dict[str, Any] | None) -> list[dict[str, Any]]:
    fp16 = 2 * config.coords_per_token
    rows = []
    for row in (evaluation or {}).get("budgets", []):
        lo, hi = row.get("ci95_pct") or (float("nan"), float("nan"))
        rows.append({**row, "compression": fp16 / row["bytes_per_token"], "ci_lo": lo, "ci_hi": hi})
    return rows


def bases_text(config: Any) -> str:
    """How the calibration's bases cover the KV heads, in words."""
    if config.head_group == 1:
        return f"one per KV head ({config.num_kv_heads} per layer, dimension {config.head_dim})"
    return (f"one per {config.head_group} KV heads ({config.num_bases} per layer, dimension {config.basis_dim}: the "
            "heads' correlations are coded too; served by SpectralKVCache, not the fused kernels)")


def render_card(config: Any, repo_id: str | None = None, *, evaluation: dict[str, Any] | None = None,
                subfolder: str | None = None) -> str:
    """The README.md text for ``config``: YAML metadata plus the measured-figures tables. ``evaluation`` (from
    :func:`spectralkv.publish.quick_evaluation`) adds the perplexity table and the ``model-index``; ``subfolder``
    is the calibration's folder inside the repo (it goes into the usage snippet)."""
    from huggingface_hub import ModelCard

    template = files("spectralkv.hub_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    split = config.kv_split(config.default_bits)
    alloc = config.allocation(config.default_bits)
    layers = []
    for row in config.measured.get("layers", []):
        l = row["layer"]
        layers.append({**row, "key_bits": float(alloc[(l, "k")].double().mean()),
                       "value_bits": float(alloc[(l, "v")].double().mean())})
    fp16 = 2 * config.coords_per_token
    eff = config.effective_bits(config.default_bits)
    card = ModelCard.from_template(
        card_metadata(config, repo_id, evaluation),
        template_str=template,
        base_model=config.base_model,
        base_model_is_hub=is_hub_id(config.base_model),
        base_model_revision=config.base_model_revision,
        repo_id=repo_id or "ORG/NAME",
        subfolder=subfolder.strip("/") if subfolder else None,
        default_bits=config.default_bits,
        effective_bits=eff,
        min_bits=config.min_bits,
        compression=16 / eff,
        key_bits=split["key_bits"],
        value_bits=split["value_bits"],
        token_scale=(("yes, " + ("one byte, log scale" if config.scale_format == "log8" else "fp16"))
                     if config.token_scale else "no"),
        key_weight=config.key_weight,
        outliers=("off" if config.outlier_threshold is None else
                  f"beyond {config.outlier_threshold:g} std ({100 * config.outlier_fraction:.2f}% of coordinates, "
                  f"{config.outlier_bits_per_token / config.coords_per_token:.3f} bits/coord)"),
        centring=("post-RoPE mean" if config.position_centring is None else
                  "pre-RoPE mean rotated to each key's position (RoPE-aware; served by SpectralKVCache)"),
        positioned=config.position_centring is not None and all("k_centre_energy" in r for r in layers),
        bytes_per_token=config.bytes_per_token(config.default_bits),
        fp16_bytes_per_token=fp16,
        sink_tokens=config.sink_tokens,
        window=config.window,
        heldout_error=config.measured.get("chosen", {}).get("mean_relative_output_error", float("nan")),
        layers=layers,
        budget_profiles=config.measured.get("budget_profiles", []),
        head_dim=config.basis_dim,
        bases=bases_text(config),
        calibration=config.calibration,
        spectralkv_version=config.spectralkv_version,
        format_version=config.format_version,
        evaluation=evaluation,
        evaluation_rows=_evaluation_rows(config, evaluation),
        evaluation_dataset=_eval_dataset(evaluation)[1] if evaluation else None,
    )
    return str(card)
