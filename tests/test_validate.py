"""Calibration folders are untrusted input: every kind of corruption is refused with a message naming the problem,
and nothing but JSON and safetensors is ever read.

Broken tensors files are written with ``safetensors.torch.save_file`` (or a raw header rewrite) and the config's
``tensors_sha256`` updated, so each case reaches the check it is about instead of stopping at the checksum."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from spectralkv.config import CONFIG_NAME, FORMAT_VERSION, TENSORS_NAME, CalibrationFormatError, SpectralKVConfig


@pytest.fixture(scope="module")
def pristine(tiny_llama_calibration: SpectralKVConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_calibration.save_pretrained(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def folder(pristine: Path, tmp_path: Path) -> Path:
    """A fresh, valid copy of the tiny calibration for each test to break."""
    return Path(shutil.copytree(pristine, tmp_path / "cal"))


def _load(folder: Path, **kw: Any) -> SpectralKVConfig:
    return SpectralKVConfig.from_pretrained(folder, **kw)


def _refused(folder: Path, match: str) -> CalibrationFormatError:
    with pytest.raises(CalibrationFormatError, match=match) as info:
        _load(folder)
    return info.value


def _edit_json(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _reseal(folder: Path) -> None:
    """Record the current tensors file's sha256 in the config, as a consistent (but malicious) artifact would."""
    sha = hashlib.sha256((folder / TENSORS_NAME).read_bytes()).hexdigest()
    _edit_json(folder, lambda d: d.update(tensors_sha256=sha))


def _rewrite_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / TENSORS_NAME))
    edit(tensors)
    save_file(tensors, str(folder / TENSORS_NAME))
    _reseal(folder)


def _read_raw(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_raw(path: Path, header: Any, data: bytes) -> None:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def test_pristine_copy_loads(folder: Path) -> None:
    """Control: the folder the other tests break is valid as written."""
    assert _load(folder).compressed_layers == [0, 1]


# -- the tensors file -------------------------------------------------------------------------------------------
def test_sha_mismatch(folder: Path) -> None:
    raw = bytearray((folder / TENSORS_NAME).read_bytes())
    raw[-1] ^= 0x01
    (folder / TENSORS_NAME).write_bytes(bytes(raw))
    _refused(folder, "does not match the sha256 recorded in the config")


def test_truncated(folder: Path) -> None:
    path = folder / TENSORS_NAME
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-100])
    _reseal(folder)
    _refused(folder, rf"is truncated: its header promises {size} bytes, the file has {size - 100}")


def test_truncated_inside_length_prefix(folder: Path) -> None:
    (folder / TENSORS_NAME).write_bytes(b"\x10\x00\x00")
    _reseal(folder)
    _refused(folder, r"truncated \(no safetensors header\)")


def test_oversized_header(folder: Path) -> None:
    path = folder / TENSORS_NAME
    path.write_bytes(struct.pack("<Q", 1 << 40) + path.read_bytes()[8:])
    _reseal(folder)
    _refused(folder, "implausible header size")


def test_corrupt_header_json(folder: Path) -> None:
    path = folder / TENSORS_NAME
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n :])
    _reseal(folder)
    _refused(folder, "corrupt safetensors header")


@pytest.mark.parametrize(
    "break_header",
    [lambda h: [1, 2, 3], lambda h: {**h, "layers.0.k.mean": "nope"},
     lambda h: {**h, "layers.0.k.mean": {"dtype": "F32", "shape": [2, 16]}},
     lambda h: {**h, "layers.0.k.mean": {"dtype": "F32", "shape": [2, 16], "data_offsets": "x"}}],
    ids=["list", "entry-not-object", "no-offsets", "bad-offsets"],
)
def test_header_of_wrong_structure(folder: Path, break_header: Callable[[dict], Any]) -> None:
    path = folder / TENSORS_NAME
    header, data = _read_raw(path)
    _write_raw(path, break_header(header), data)
    _reseal(folder)
    _refused(folder, TENSORS_NAME)


def test_header_offsets_inconsistent_with_shape(folder: Path) -> None:
    """The header's byte ranges disagree with dtype x shape: safetensors' own checks must surface as ours."""
    path = folder / TENSORS_NAME
    header, data = _read_raw(path)
    name = "layers.0.k.mean"
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end - 4]
    _write_raw(path, header, data)
    _reseal(folder)
    _refused(folder, TENSORS_NAME)


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [("layers.0.k.basis", torch.float64, "F64"), ("layers.1.v.bits", torch.int64, "I64"),
     ("layers.0.v.codebooks", torch.float16, "F16")],
)
def test_wrong_dtype(folder: Path, name: str, dtype: torch.dtype, expected: str) -> None:
    _rewrite_tensors(folder, lambda t: t.update({name: t[name].to(dtype)}))
    want = "U8" if name.endswith("bits") else "F32"
    _refused(folder, rf"tensor '{name}' has dtype {expected}, expected {want}")


def test_missing_scale_range(folder: Path) -> None:
    """A log8 calibration without one of its scale ranges is refused by name (the tiny calibration is log8)."""
    assert json.loads((folder / CONFIG_NAME).read_text())["scale_format"] == "log8"
    _rewrite_tensors(folder, lambda t: t.pop("layers.1.k.scale_range"))
    _refused(folder, r"lacks tensors the config requires, e.g. 'layers.1.k.scale_range'")


def test_unknown_scale_format(folder: Path) -> None:
    _edit_json(folder, lambda d: d.update(scale_format="log4"))
    _refused(folder, r"scale_format must be one of \('fp16', 'log8'\), got 'log4'")


def test_missing_tensor(folder: Path) -> None:
    _rewrite_tensors(folder, lambda t: t.pop("layers.1.v.weights"))
    _refused(folder, r"lacks tensors the config requires, e.g. 'layers.1.v.weights' \(1 missing\)")


def test_extra_tensor(folder: Path) -> None:
    _rewrite_tensors(folder, lambda t: t.update({"layers.7.k.mean": torch.zeros(2, 16)}))
    _refused(folder, "unexpected tensors, e.g. 'layers.7.k.mean'")


def _set(name: str, fn: Callable[[torch.Tensor], None]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        x = t[name].clone()
        fn(x)
        t[name] = x

    return edit


def _rotate_eigs(x: torch.Tensor) -> None:
    x[0] = x[0].flip(-1).clone()


VALUE_CASES = [
    ("layers.0.k.basis", lambda x: x.__setitem__((0, 3, 5), float("nan")), "layer 0 keys: basis contains NaN"),
    ("layers.1.v.mean", lambda x: x.__setitem__((1, 0), float("inf")), "layer 1 values: mean contains NaN or inf"),
    ("layers.1.v.basis", lambda x: x.mul_(1.01), "layer 1 values: basis is not orthonormal"),
    ("layers.0.k.eigenvalues", _rotate_eigs, "layer 0 keys: eigenvalues must be sorted in decreasing order"),
    ("layers.0.v.eigenvalues", lambda x: x.__setitem__((0, -1), -1.0), "eigenvalues must be non-negative"),
    ("layers.0.v.weights", lambda x: x.__setitem__((0, 0), -1.0), "weights and distortion must be non-negative"),
    ("layers.1.k.codebooks", lambda x: x[2, :8].copy_(x[2, :8].flip(0)), "the 3-bit codebook is not sorted"),
    ("layers.0.k.bits", lambda x: x[0, :8].fill_(9), "bits per coordinate must be in 0..8, found 9"),
    ("layers.0.k.bits", lambda x: x.__setitem__((0, 0), int(x[0, 0]) % 8 + 1),
     "-bit coordinates per basis must come in multiples of 8"),
    ("layers.1.v.scale_range", lambda x: x.__setitem__(1, float("nan")), "layer 1 values: scale_range contains NaN"),
    ("layers.0.k.scale_range", lambda x: x.copy_(x.flip(0)), r"layer 0 keys: scale_range \[lo, hi\] must have lo < hi"),
]


@pytest.mark.parametrize(("name", "fn", "match"), VALUE_CASES, ids=[m for _, _, m in VALUE_CASES])
def test_bad_values(folder: Path, name: str, fn: Callable[[torch.Tensor], None], match: str) -> None:
    _rewrite_tensors(folder, _set(name, fn))
    _refused(folder, match)


def test_allocation_over_budget(folder: Path) -> None:
    """Stored bits that spend more than ``default_bits`` pays for."""
    _edit_json(folder, lambda d: d.update(default_bits=1.0))
    _refused(folder, "spends 384 code bits per token, more than default_bits=1.0 allows .128.: budget mismatch")


# -- the config JSON --------------------------------------------------------------------------------------------
def test_newer_format_version(folder: Path) -> None:
    _edit_json(folder, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    err = _refused(folder, "upgrade spectralkv")
    assert f"format version {FORMAT_VERSION + 1}" in str(err) and f"format version {FORMAT_VERSION} and older" in str(
        err)


def test_unknown_old_format_version(folder: Path) -> None:
    _edit_json(folder, lambda d: d.update(format_version=0))
    _refused(folder, "unknown format version 0")


@pytest.mark.parametrize("text", ["{not json", "", "\udcff"])
def test_invalid_json(folder: Path, text: str) -> None:
    (folder / CONFIG_NAME).write_bytes(text.encode("utf-8", "surrogateescape"))
    _refused(folder, f"{CONFIG_NAME} is not valid JSON")


def test_json_not_an_object(folder: Path) -> None:
    (folder / CONFIG_NAME).write_text("[1, 2]")
    _refused(folder, "must hold a JSON object")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.pop("tensors_sha256"), "missing the required field 'tensors_sha256'"),
        (lambda d: d.update(token_scale="yes"), r"field 'token_scale' has the wrong type \(str\)"),
        (lambda d: d.update(sink_tokens=True), r"field 'sink_tokens' has the wrong type \(bool\)"),
        (lambda d: d["fingerprint"].update(head_dim=0), "fingerprint field 'head_dim' must be a positive integer"),
        (lambda d: d.update(compressed_layers=[0, 0]), "compressed_layers must be distinct"),
        (lambda d: d.update(compressed_layers=[]), "compressed_layers is empty"),
        (lambda d: d.update(group_size=3), "group_size 3 must be positive and divide head_dim 16"),
        (lambda d: d.update(default_bits=12), r"default_bits must be in \(0, 8\], got 12"),
        (lambda d: d.update(window=-1), "window must be >= 0, got -1"),
        (lambda d: d.update(measured=[1]), "'measured' must be a JSON object"),
    ],
)
def test_bad_fields(folder: Path, edit: Callable[[dict], Any], match: str) -> None:
    _edit_json(folder, edit)
    _refused(folder, match)


def test_wrong_layer_count(folder: Path) -> None:
    """The fingerprint says one layer, the calibration lists two."""
    _edit_json(folder, lambda d: d["fingerprint"].update(num_hidden_layers=1))
    _refused(folder, "compressed_layers must be distinct layer indices below num_hidden_layers")


def test_fewer_layers_in_config_than_tensors(folder: Path) -> None:
    def edit(d: dict[str, Any]) -> None:  # a config consistent in itself (its weight profiles trimmed too)
        d.update(compressed_layers=[0])
        for p in d["weight_profiles"]:
            p["factors"] = p["factors"][:1]

    _edit_json(folder, edit)
    _refused(folder, "unexpected tensors, e.g. 'layers.1.")


def test_weight_profiles_must_match_the_compressed_layers(folder: Path) -> None:
    _edit_json(folder, lambda d: d.update(compressed_layers=[0], weight_profiles=[
        {"bits": 2.0, "factors": [[1.0, 1.0], [1.0, 1.0]]}]))
    _refused(folder, "weight_profiles.0..factors must be 1 pairs")


def test_shape_mismatch_with_fingerprint(folder: Path) -> None:
    _edit_json(folder, lambda d: d["fingerprint"].update(num_key_value_heads=4))
    _refused(folder, r"has shape \(2, 16.*\), expected \(4, 16.*\) from the config's fingerprint")


@pytest.mark.parametrize("missing", [CONFIG_NAME, TENSORS_NAME])
def test_missing_file(folder: Path, missing: str) -> None:
    (folder / missing).unlink()
    err = _refused(folder, f"is not a spectralkv calibration: {missing} is missing")
    assert "spectralkv calibrate --out" in str(err)


def test_path_that_is_a_file(folder: Path) -> None:
    with pytest.raises(CalibrationFormatError, match="neither a calibration folder nor a Hub repo id"):
        _load(folder / CONFIG_NAME)


# -- pickles are never loaded ---------------------------------------------------------------------------------
class _Trap:
    """Unpickling this creates ``path``: proof that something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def plant_pickle(folder: Path, name: str, sentinel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plant a booby-trapped pickle ``name`` in ``folder`` and make every pickle loader fail the test if called."""
    (folder / name).write_bytes(pickle.dumps(_Trap(sentinel)))

    def forbidden(*_: Any, **__: Any) -> None:
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "spectralkv.pkl", "weights.pt"])
def test_planted_pickle_is_never_loaded(folder: Path, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    sentinel = tmp_path / "unpickled"
    plant_pickle(folder, name, sentinel, monkeypatch)
    with pytest.warns(UserWarning, match=f"Ignoring {name}: spectralkv never loads pickle files"):
        cfg = _load(folder)
    assert cfg.compressed_layers == [0, 1]
    assert not sentinel.exists()


def test_clean_folder_loads_without_warnings(folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _load(folder)
