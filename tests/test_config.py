"""SpectralKVConfig: bit-exact save/load, budget overrides that re-allocate, compatibility checks that say what
differs, and clear errors for folders that cannot be written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny

from spectralkv.allocation import allocate
from spectralkv.config import CONFIG_NAME, FORMAT_VERSION, TENSORS_NAME, SpectralKVConfig, tensor_name
from spectralkv.fingerprint import IncompatibleCalibrationError, UnsupportedArchitectureError


def with_token_scale(cfg: SpectralKVConfig, scale_format: str = "fp16") -> SpectralKVConfig:
    """A per-token-scale variant of ``cfg`` with its own stored allocation (consistent at ``default_bits``); an
    fp16 variant drops the log8 scale ranges, which its files must not hold."""
    tensors = {k: v for k, v in cfg.tensors.items() if scale_format == "log8" or not k.endswith(".scale_range")}
    new = dataclasses.replace(cfg, token_scale=True, scale_format=scale_format, tensors=tensors)
    for (layer, kind), bits in allocate(new.weighted_distortion(), new.code_bits_for(new.default_bits)).items():
        tensors[tensor_name(layer, kind, "bits")] = bits
    return new


@pytest.fixture(scope="module")
def saved(tiny_llama_calibration: SpectralKVConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_calibration.save_pretrained(tmp_path_factory.mktemp("skv"))


def _assert_same(a: SpectralKVConfig, b: SpectralKVConfig) -> None:
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].dtype == b.tensors[name].dtype, name
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    assert a.to_json_dict() == b.to_json_dict()


def test_round_trip_bit_exact(tiny_llama_calibration: SpectralKVConfig, saved: Path) -> None:
    back = SpectralKVConfig.from_pretrained(saved)
    _assert_same(tiny_llama_calibration, back)
    assert back.bits == tiny_llama_calibration.bits
    assert back.format_version == FORMAT_VERSION
    # every field of the dataclass survives, not just those in to_json_dict
    for f in dataclasses.fields(SpectralKVConfig):
        if f.name != "tensors":
            assert getattr(back, f.name) == getattr(tiny_llama_calibration, f.name), f.name
    # and behaves identically
    assert back.effective_bits(2.0) == tiny_llama_calibration.effective_bits(2.0)


def test_saved_folder_contents(saved: Path) -> None:
    """Exactly the three artifact files (no temp or probe files left), JSON sorted and indented, sha recorded."""
    assert sorted(p.name for p in saved.iterdir()) == sorted([CONFIG_NAME, TENSORS_NAME, "README.md"])
    text = (saved / CONFIG_NAME).read_text(encoding="utf-8")
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert data["tensors_sha256"] == hashlib.sha256((saved / TENSORS_NAME).read_bytes()).hexdigest()
    assert data["tensors_file"] == TENSORS_NAME
    assert data["format_version"] == FORMAT_VERSION and isinstance(data["spectralkv_version"], str)


def test_save_twice_overwrites_cleanly(tiny_llama_calibration: SpectralKVConfig, tmp_path: Path) -> None:
    tiny_llama_calibration.save_pretrained(tmp_path)
    tiny_llama_calibration.with_bits(2.0).save_pretrained(tmp_path)
    _assert_same(tiny_llama_calibration, SpectralKVConfig.from_pretrained(tmp_path))


def test_bits_override_reallocates(tiny_llama_calibration: SpectralKVConfig, saved: Path) -> None:
    stored = SpectralKVConfig.from_pretrained(saved)
    wd = stored.weighted_distortion()
    # the stored allocation is reproducible from the stored tensors
    again = allocate(wd, stored.code_bits_for(stored.default_bits), stored.group_size)
    for key, bits in again.items():
        assert torch.equal(bits, stored.tensor(*key, "bits")), key
    low = SpectralKVConfig.from_pretrained(saved, bits=1.5)
    assert (low.bits, low.default_bits) == (1.5, tiny_llama_calibration.default_bits)
    expected = allocate(wd, low.code_bits_for(1.5), low.group_size)
    alloc = low.allocation()
    assert set(alloc) == set(expected)
    for key in expected:
        assert torch.equal(alloc[key], expected[key]), key
        assert (alloc[key] <= stored.tensor(*key, "bits")).all()
    assert low.effective_bits() <= 1.5 < stored.effective_bits()
    assert sum(q.code_bits_per_token for q in low.quantizers().values()) == sum(
        int(t.long().sum()) for t in expected.values())


def test_with_bits(tiny_llama_calibration: SpectralKVConfig) -> None:
    cfg = tiny_llama_calibration
    two = cfg.with_bits(2)
    assert two.bits == 2.0 and cfg.bits == cfg.default_bits, "with_bits must not change the original"
    assert two.tensors is cfg.tensors, "tensors are shared, not copied"
    assert two.effective_bits() <= 2.0 and cfg.effective_bits() == cfg.default_bits
    assert two.allocation().keys() == cfg.allocation().keys()
    assert all(torch.equal(two.allocation()[k], cfg.allocation(2.0)[k]) for k in two.allocation())
    assert not all(torch.equal(two.allocation()[k], cfg.allocation()[k]) for k in two.allocation())
    for bad in (0, 9, float("nan")):
        with pytest.raises(ValueError, match="bit budget"):
            cfg.with_bits(bad)


@pytest.mark.parametrize("scale_format,floor", [("fp16", 1.0), ("log8", 0.5)])
def test_min_bits(tiny_llama_calibration: SpectralKVConfig, tmp_path: Path, scale_format: str, floor: float) -> None:
    """With per-token scales, a budget must pay for them: 16 bits per head / 16 dims = 1 bit per coordinate in fp16,
    half that as one log8 byte."""
    cfg = with_token_scale(tiny_llama_calibration, scale_format)
    assert cfg.min_bits == floor
    for call in (lambda: cfg.with_bits(floor - 0.25), lambda: cfg.allocation(floor / 2),
                 lambda: dataclasses.replace(cfg, bits=floor - 0.1)):
        with pytest.raises(ValueError, match=rf"too small .* and exact outliers alone cost {floor:.3f} bits .* above "
                                             rf"{floor:.3f}"):
            call()
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="too small"):
        SpectralKVConfig.from_pretrained(tmp_path, bits=floor / 2)
    ok = SpectralKVConfig.from_pretrained(tmp_path, bits=floor + 0.25)
    assert ok.token_scale and ok.scale_format == scale_format and ok.effective_bits() <= floor + 0.25
    assert all(q.scale_dtype == (torch.uint8 if scale_format == "log8" else torch.float16)
               for q in ok.quantizers().values())
    assert tiny_llama_calibration.min_bits == 0.0  # no scales: any positive budget


@pytest.mark.parametrize(("field", "value", "match"), [("sink_tokens", -1, "`sink_tokens` must be >= 0, got -1"),
                                                      ("window", -3, "`window` must be >= 0, got -3"),
                                                      ("default_bits", 0, "bit budget")])
def test_constructor_validates(tiny_llama_calibration: SpectralKVConfig, field: str, value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(tiny_llama_calibration, **{field: value})


def test_check_compatible(tiny_llama: torch.nn.Module, tiny_llama_calibration: SpectralKVConfig, saved: Path) -> None:
    tiny_llama_calibration.check_compatible(tiny_llama)  # the model it was made for
    SpectralKVConfig.from_pretrained(saved, model=tiny_llama)
    other = make_tiny("llama", num_key_value_heads=4)
    with pytest.raises(IncompatibleCalibrationError, match="num_key_value_heads: calibration has 2, model has 4"):
        tiny_llama_calibration.check_compatible(other)
    with pytest.raises(IncompatibleCalibrationError, match="num_key_value_heads"):
        SpectralKVConfig.from_pretrained(saved, model=other)
    deeper = make_tiny("llama", num_hidden_layers=3)
    with pytest.raises(IncompatibleCalibrationError, match="num_hidden_layers: calibration has 2, model has 3"):
        tiny_llama_calibration.check_compatible(deeper)
    with pytest.raises(IncompatibleCalibrationError, match="model_type: calibration has 'llama', model has 'qwen2'"):
        tiny_llama_calibration.check_compatible(make_tiny("qwen2"))
    with pytest.raises(IncompatibleCalibrationError, match="rope_parameters"):
        tiny_llama_calibration.check_compatible(make_tiny("llama", rope_theta=1234.0))


def test_check_compatible_unsupported(tiny_llama_calibration: SpectralKVConfig) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        tiny_llama_calibration.check_compatible(gpt2)


def test_unwritable_output_folder(tiny_llama_calibration: SpectralKVConfig, tmp_path: Path) -> None:
    """A parent that is a regular file fails even as root (unlike chmod-based read-only folders)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for target in (blocker / "calibration", blocker):
        with pytest.raises(OSError, match="Cannot write the calibration to .*writable --out folder"):
            tiny_llama_calibration.save_pretrained(target)
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_real_smollm2_fingerprint_and_mismatch(smollm2: tuple[Any, Any], tiny_llama_calibration: SpectralKVConfig
                                               ) -> None:
    """The real GGUF-loaded SmolLM2 fingerprints as the Llama geometry it is, and a calibration for another model
    is refused with every differing field named."""
    from spectralkv.fingerprint import fingerprint

    model, _ = smollm2
    fp = fingerprint(model)
    assert (fp["model_type"], fp["num_hidden_layers"], fp["num_attention_heads"], fp["num_key_value_heads"],
            fp["head_dim"], fp["hidden_size"]) == ("llama", 30, 9, 3, 64, 576)
    assert fp["rope_parameters"]["rope_theta"] == 100000.0
    assert fp["layer_types"] == ["full_attention"] * 30 and fp["sliding_window"] is None
    json.dumps(fp)  # stored in the config JSON as is
    with pytest.raises(IncompatibleCalibrationError) as info:
        tiny_llama_calibration.check_compatible(model)
    msg = str(info.value)
    for field in ("num_hidden_layers", "num_key_value_heads: calibration has 2, model has 3", "head_dim: calibration "
                  "has 16, model has 64", "hidden_size"):
        assert field in msg
    assert "tiny-random-llama" in msg and "spectralkv calibrate" in msg
