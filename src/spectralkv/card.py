"""Render a calibration's Hub model card from the template in ``hub_cards/``."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

TEMPLATE = "calibration_card.md"


def card_metadata(config: Any, repo_id: str | None = None) -> Any:
    from huggingface_hub import ModelCardData

    return ModelCardData(
        library_name="spectralkv",
        base_model=config.base_model,
        base_model_relation="adapter",
        tags=["spectralkv", "kv-cache", "quantization", f"{config.default_bits:g}-bit"],
        license=None,
    )


def render_card(config: Any, repo_id: str | None = None) -> str:
    """The README.md text for ``config``: YAML metadata plus the measured-figures tables."""
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
        card_metadata(config, repo_id),
        template_str=template,
        base_model=config.base_model,
        base_model_revision=config.base_model_revision,
        repo_id=repo_id or "ORG/NAME",
        default_bits=config.default_bits,
        effective_bits=eff,
        min_bits=config.min_bits,
        compression=16 / eff,
        key_bits=split["key_bits"],
        value_bits=split["value_bits"],
        token_scale=config.token_scale,
        key_weight=config.key_weight,
        bytes_per_token=config.bytes_per_token(config.default_bits),
        fp16_bytes_per_token=fp16,
        sink_tokens=config.sink_tokens,
        window=config.window,
        heldout_error=config.measured.get("chosen", {}).get("mean_relative_output_error", float("nan")),
        layers=layers,
        head_dim=config.head_dim,
        calibration=config.calibration,
        spectralkv_version=config.spectralkv_version,
        format_version=config.format_version,
    )
    return str(card)
