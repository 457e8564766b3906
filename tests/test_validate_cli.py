"""``spectralkv validate`` / ``validate_calibration``: a corpus of deliberately broken calibrations, each refused by
``from_pretrained`` and reported by name by the validator with the very same message; pickles reported and never
opened; the fingerprint against a model; Hub repos; and everything ``calibrate`` produces passes.

The breaking helpers (and the ``pristine`` / ``folder`` fixtures) are the ones of ``test_validate.py``."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_validate
import torch
from conftest import TINY_COMMON, make_tiny, tiny_calibrate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hub import SHA_MAIN, _files, _populate
from test_validate import VALUE_CASES, _edit_json, _read_raw, _reseal, _rewrite_tensors, _set, _write_raw, plant_pickle

from spectralkv.cli import main
from spectralkv.config import CONFIG_NAME, FORMAT_VERSION, TENSORS_NAME, CalibrationFormatError, SpectralKVConfig
from spectralkv.validate import STEPS, ValidationReport, validate_calibration

pristine = test_validate.pristine  # the fixtures: a valid tiny calibration, and a fresh copy of it per test
folder = test_validate.folder


# -- the corpus -------------------------------------------------------------------------------------------------
def _truncate(folder: Path) -> None:
    path = folder / TENSORS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    _reseal(folder)


def _oversized_header(folder: Path) -> None:
    path = folder / TENSORS_NAME
    path.write_bytes(struct.pack("<Q", 1 << 40) + path.read_bytes()[8:])
    _reseal(folder)


def _trailing_bytes(folder: Path) -> None:
    """A valid file with 1 MiB appended: larger than its tensors."""
    path = folder / TENSORS_NAME
    path.write_bytes(path.read_bytes() + b"\0" * (1 << 20))
    _reseal(folder)


def _span_beyond_fingerprint(folder: Path) -> None:
    """The last tensor's byte range reaches past what the fingerprint's shapes need (file padded to match)."""
    path = folder / TENSORS_NAME
    header, data = _read_raw(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 64
    _write_raw(path, header, data + b"\0" * 64)
    _reseal(folder)


def _flip_last_byte(folder: Path) -> None:
    raw = bytearray((folder / TENSORS_NAME).read_bytes())
    raw[-1] ^= 0x01
    (folder / TENSORS_NAME).write_bytes(bytes(raw))


def _value_case(match: str) -> Callable[[Path], None]:
    name, fn, _ = next(c for c in VALUE_CASES if c[2] == match)
    return lambda folder: _rewrite_tensors(folder, _set(name, fn))


CORPUS: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("truncated", _truncate, "is truncated: its header promises", "safetensors header"),
    ("oversized-header", _oversized_header, "implausible header size", "safetensors header"),
    ("trailing-bytes", _trailing_bytes, "1048576 unexpected bytes after its tensors", "safetensors header"),
    ("span-beyond-fingerprint", _span_beyond_fingerprint, "more than the .* bytes the config's fingerprint implies",
     "safetensors header"),
    ("wrong-dtype", lambda f: _rewrite_tensors(f, lambda t: t.update(
        {"layers.0.k.basis": t["layers.0.k.basis"].double()})),
     "tensor 'layers.0.k.basis' has dtype F64, expected F32", "safetensors header"),
    ("missing-tensor", lambda f: _rewrite_tensors(f, lambda t: t.pop("layers.1.v.weights")),
     "lacks tensors the config requires", "safetensors header"),
    ("sha-mismatch", _flip_last_byte, "does not match the sha256 recorded in the config", "sha256"),
    ("nan-basis", _value_case("layer 0 keys: basis contains NaN"), "layer 0 keys: basis contains NaN",
     "finite values"),
    ("non-orthogonal", _value_case("layer 1 values: basis is not orthonormal"),
     "layer 1 values: basis is not orthonormal", "orthonormal bases"),
    ("unsorted-eigenvalues", _value_case("layer 0 keys: eigenvalues must be sorted in decreasing order"),
     "eigenvalues must be sorted", "eigenvalues"),
    ("bits-out-of-range", _value_case("bits per coordinate must be in 0..8, found 9"),
     "bits per coordinate must be in 0..8, found 9", "bits"),
    ("unsorted-codebook", _value_case("the 3-bit codebook is not sorted"), "the 3-bit codebook is not sorted",
     "codebooks"),
    ("budget-mismatch", lambda f: _edit_json(f, lambda d: d.update(default_bits=1.0)), "budget mismatch", "budget"),
    ("wrong-layer-count", lambda f: _edit_json(f, lambda d: d["fingerprint"].update(num_hidden_layers=1)),
     "compressed_layers must be distinct layer indices below num_hidden_layers", "config schema"),
    ("shape-vs-fingerprint", lambda f: _edit_json(f, lambda d: d["fingerprint"].update(num_key_value_heads=4)),
     "expected \\(4, 16.*from the config's fingerprint", "safetensors header"),
    ("missing-tensors-file", lambda f: (f / TENSORS_NAME).unlink(),
     f"is not a spectralkv calibration: {TENSORS_NAME} is missing", "files"),
    ("missing-config", lambda f: (f / CONFIG_NAME).unlink(),
     f"is not a spectralkv calibration: {CONFIG_NAME} is missing", "files"),
    ("invalid-json", lambda f: (f / CONFIG_NAME).write_text("{not json"), "is not valid JSON", "config JSON"),
    ("unknown-format-version", lambda f: _edit_json(f, lambda d: d.update(format_version=0)),
     "unknown format version 0", "format version"),
    ("newer-format-version", lambda f: _edit_json(f, lambda d: d.update(format_version=FORMAT_VERSION + 1)),
     f"format version {FORMAT_VERSION + 1}, but this spectralkv reads format version {FORMAT_VERSION}",
     "format version"),
    ("wrong-field-type", lambda f: _edit_json(f, lambda d: d.update(token_scale="yes")),
     "field 'token_scale' has the wrong type", "config schema"),
]


@pytest.mark.parametrize(("breaker", "match", "check"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_corpus_refused_on_load_and_reported_by_name(
    folder: Path, breaker: Callable[[Path], None], match: str, check: str, capsys: pytest.CaptureFixture[str]
) -> None:
    breaker(folder)
    with pytest.raises(CalibrationFormatError, match=match) as info:
        SpectralKVConfig.from_pretrained(folder)
    report = validate_calibration(folder)
    assert not report.ok
    first = report.failures[0]
    assert (first.name, first.message) == (check, str(info.value)), "the report shows what loading raises"
    assert main(["validate", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  {check}" in out and str(info.value).splitlines()[0] in out and "FAIL:" in out


def test_report_of_a_pristine_copy(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = validate_calibration(folder)
    assert report.ok, report.format()
    assert [c.name for c in report.checks] == ["files", *(s.name for s in STEPS), "fingerprint"]
    assert all(c.passed for c in report.checks[:-1])
    assert report["fingerprint"].status == "skip" and "--model" in report["fingerprint"].message
    assert main(["validate", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and len(data["checks"]) == len(report.checks)


def test_independent_checks_still_run_after_a_failure(folder: Path) -> None:
    """A tampered sha256 does not stop the header and value checks; a bad header skips everything that reads
    tensor data (nothing is loaded past a header that failed)."""
    _edit_json(folder, lambda d: d.update(tensors_sha256="0" * 64))
    report = validate_calibration(folder)
    assert [c.name for c in report.failures] == ["sha256"]
    assert report["safetensors header"].passed and report["orthonormal bases"].passed
    _oversized_header(folder)
    report = validate_calibration(folder)
    assert report["safetensors header"].status == "fail"
    for name in ("tensor data", "finite values", "orthonormal bases", "bits", "budget"):
        assert report[name].status == "skip", name
    assert report["tensor data"].message == "not run: needs 'safetensors header' to pass"


# -- pickles ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pytorch_model.bin", "calibration.pkl", "weights.pt"])
def test_planted_pickle_reported_never_opened(folder: Path, tmp_path: Path, name: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = tmp_path / "unpickled"
    plant_pickle(folder, name, sentinel, monkeypatch)
    report = validate_calibration(folder)
    assert [c.name for c in report.failures] == ["no pickle files"]
    assert f"Ignoring {name}: spectralkv never loads pickle files" in report.failures[0].message
    assert main(["validate", str(folder)]) == 1
    with pytest.warns(UserWarning, match=report.failures[0].message.split(":")[0]):  # loading only warns
        SpectralKVConfig.from_pretrained(folder)
    assert not sentinel.exists()


# -- the fingerprint --------------------------------------------------------------------------------------------
def test_fingerprint_against_a_model(folder: Path, tiny_llama: torch.nn.Module) -> None:
    assert validate_calibration(folder, model=tiny_llama)["fingerprint"].passed
    from transformers import AutoConfig

    other = AutoConfig.for_model("llama", **{**TINY_COMMON, "num_hidden_layers": 3})
    report = validate_calibration(folder, model=other)
    assert [c.name for c in report.failures] == ["fingerprint"]
    assert "num_hidden_layers: calibration has 2, model has 3" in report.failures[0].message


def test_cli_model_reads_only_the_config(folder: Path, tiny_llama: torch.nn.Module, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    tiny_llama.config.save_pretrained(tmp_path / "model")  # config.json only: no weights to load
    assert main(["validate", str(folder), "--model", str(tmp_path / "model")]) == 0
    assert "PASS  fingerprint" in capsys.readouterr().out
    assert main(["validate", str(folder), "--model", str(tmp_path / "missing")]) == 1
    assert "Could not read the model's config" in capsys.readouterr().out


# -- Hub repos --------------------------------------------------------------------------------------------------
def test_hub_repo_from_the_offline_cache(pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "model.pkl").write_bytes(pickle.dumps(None))
    cache = tmp_path / "hub"
    _populate(cache, "org/cal", {SHA_MAIN: {**_files(pristine), **_files(planted, "v2/")}}, {"main": SHA_MAIN})
    _populate(cache, "org/planted", {SHA_MAIN: {**_files(pristine), **_files(planted)}}, {"main": SHA_MAIN})
    assert validate_calibration("org/cal", cache_dir=cache).ok
    report = validate_calibration("org/planted", cache_dir=cache)
    assert [c.name for c in report.failures] == ["no pickle files"]
    missing = validate_calibration("org/other", cache_dir=cache)
    assert missing["files"].status == "fail" and "hf download org/other" in missing["files"].message
    assert all(c.status == "skip" for c in missing.checks[1:])


def test_hub_repo_listing_reports_pickles(pristine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online, the repo's own file listing is checked for pickles (which are never downloaded)."""
    from huggingface_hub import HfApi, constants

    seen: list[tuple[str, Any]] = []

    def list_repo_files(self: HfApi, repo_id: str, revision: str | None = None, **_: Any) -> list[str]:
        seen.append((repo_id, revision))
        return [CONFIG_NAME, TENSORS_NAME, "README.md", "pytorch_model.bin", "other/x.pt", "sub/y.pkl"]

    monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("spectralkv.config._resolve_files",  # what hf_hub_download would return
                        lambda *a: (pristine / CONFIG_NAME, pristine / TENSORS_NAME))
    report = validate_calibration("org/cal", revision="v1")
    assert seen == [("org/cal", "v1")]
    assert [c.name for c in report.failures] == ["no pickle files"]
    assert report.failures[0].message.startswith("Ignoring pytorch_model.bin: ")  # other folders are not this one
    sub = validate_calibration("org/cal", subfolder="sub")
    assert sub.failures[0].message.startswith("Ignoring y.pkl: ")


# -- everything calibrate produces passes -----------------------------------------------------------------------
_MODELS: dict[str, torch.nn.Module] = {}


@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(model_type=st.sampled_from(["llama", "qwen2", "gemma2"]),
       bits=st.sampled_from([1.5, 2.0, 2.5, 3.0, 4.0, 6.0]))
def test_validate_accepts_what_calibrate_produces(model_type: str, bits: float, tmp_path: Path) -> None:
    if model_type not in _MODELS:
        _MODELS[model_type] = make_tiny(model_type, num_hidden_layers=2)  # gemma2: layer 0 slides, 1 is compressed
    model = _MODELS[model_type]
    cfg = tiny_calibrate(model, bits=bits, tokens=512, heldout_tokens=128)
    out = cfg.save_pretrained(tmp_path / f"{model_type}-{bits}")
    report = validate_calibration(out, model=model)
    assert isinstance(report, ValidationReport) and report.ok, report.format()
    assert report["budget"].message.startswith(f"default {bits:g} bits/coordinate")
