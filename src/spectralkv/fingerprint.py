"""Architecture fingerprint: the facts about a model that a calibration depends on.

A calibration is only valid for the exact attention geometry it was measured on; ``check_compatible`` compares
fingerprints field by field so the error names what differs.
"""

from __future__ import annotations

from typing import Any

# Families whose attention goes through transformers' AttentionInterface and a standard cache ``update`` call,
# and that the test suite covers (real SmolLM2/Llama, tiny random configs for the others).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
SLIDING_TYPES = ("sliding_attention", "chunked_attention")


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not one spectralkv knows how to compress."""


class IncompatibleCalibrationError(ValueError):
    """A calibration does not match the model it is being used with."""


def text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def layer_types(config: Any) -> list[str]:
    cfg = text_config(config)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        sliding = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
        types = ["sliding_attention" if sliding else "full_attention"] * cfg.num_hidden_layers
    return list(types)


def fingerprint(model_or_config: Any) -> dict[str, Any]:
    """The fields of a model config that a calibration depends on (JSON-serialisable)."""
    config = getattr(model_or_config, "config", model_or_config)
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):
        rope = {k: {kk: v[kk] for kk in sorted(v)} for k, v in sorted(rope.items())}  # per layer type
    return {
        "model_type": cfg.model_type,
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        "hidden_size": int(cfg.hidden_size),
        "rope_parameters": dict(rope) if isinstance(rope, dict) else rope,
        "layer_types": layer_types(cfg),
        "sliding_window": getattr(cfg, "sliding_window", None),
    }


def check_supported(model_or_config: Any) -> None:
    config = getattr(model_or_config, "config", model_or_config)
    cfg = text_config(config)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"spectralkv does not support model_type {mt!r} yet (supported: {', '.join(SUPPORTED_MODEL_TYPES)}). "
            "Open an issue with the model id; other architectures may store their cache differently."
        )
    if not getattr(cfg, "use_cache", True) and getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError("This model has no decoder KV cache to compress.")


def compressed_layers(fp: dict[str, Any]) -> list[int]:
    """Layers whose cache spectralkv compresses: every full-attention layer. Sliding-window layers keep their
    bounded window in full precision (their memory does not grow with context)."""
    return [i for i, t in enumerate(fp["layer_types"]) if t not in SLIDING_TYPES]


def mismatches(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable list of fields that differ."""
    out = []
    for key in sorted(set(expected) | set(actual)):
        if expected.get(key) != actual.get(key):
            e, a = expected.get(key), actual.get(key)
            if isinstance(e, list) and isinstance(a, list) and len(e) > 6:
                e, a = f"list of {len(e)}", f"list of {len(a)}"
            out.append(f"{key}: calibration has {e!r}, model has {a!r}")
    return out
