"""Validation of calibration artifacts, which are untrusted input (they may come from anyone on the Hub).

Order matters: the JSON config is parsed and checked first, then the safetensors *header* (names, dtypes, shapes,
size) before any tensor is read, then the tensor values (finite, orthonormal bases, sorted eigenvalues, bits in
range and within budget, sorted codebooks). Nothing here unpickles or executes anything.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch

from .codebook import CODEBOOK_SIZE, MAX_BITS

MAX_HEADER_BYTES = 16 * 1024 * 1024
ORTHONORMAL_TOL = 1e-3
REQUIRED = {
    "format_version": int,
    "base_model": str,
    "fingerprint": dict,
    "compressed_layers": list,
    "default_bits": (int, float),
    "token_scale": bool,
    "key_weight": (int, float),
    "sink_tokens": int,
    "window": int,
    "group_size": int,
    "tensors_sha256": str,
}
FINGERPRINT_INT_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")


def _fail(msg: str) -> None:
    from .config import CalibrationFormatError

    raise CalibrationFormatError(msg)


def read_config_json(path: Path) -> dict[str, Any]:
    from .config import FORMAT_VERSION

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(f"{path.name} is not valid JSON ({e}); the calibration is corrupt, re-download or re-create it.")
    if not isinstance(data, dict):
        _fail(f"{path.name} must hold a JSON object.")
    version = data.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        _fail(
            f"This calibration uses format version {version}, but this spectralkv reads format version "
            f"{FORMAT_VERSION} and older: upgrade spectralkv (`pip install -U spectralkv`)."
        )
    for key, typ in REQUIRED.items():
        if key not in data:
            _fail(f"{path.name} is missing the required field {key!r}.")
        if not isinstance(data[key], typ) or (typ is int and isinstance(data[key], bool)):
            _fail(f"{path.name}: field {key!r} has the wrong type ({type(data[key]).__name__}).")
    if data["format_version"] < 1:
        _fail(f"{path.name}: unknown format version {data['format_version']}.")
    fp = data["fingerprint"]
    for key in FINGERPRINT_INT_FIELDS:
        if not isinstance(fp.get(key), int) or fp[key] <= 0:
            _fail(f"{path.name}: fingerprint field {key!r} must be a positive integer, got {fp.get(key)!r}.")
    layers = data["compressed_layers"]
    if not layers:
        _fail(f"{path.name}: compressed_layers is empty; a calibration compresses at least one layer.")
    if not all(isinstance(i, int) and 0 <= i < fp["num_hidden_layers"] for i in layers) or len(set(layers)) != len(
        layers
    ):
        _fail(f"{path.name}: compressed_layers must be distinct layer indices below num_hidden_layers.")
    if data["group_size"] <= 0 or fp["head_dim"] % data["group_size"]:
        _fail(f"{path.name}: group_size {data['group_size']} must be positive and divide head_dim {fp['head_dim']}.")
    # Checked here so a bad artifact is a CalibrationFormatError, not a ValueError from the config's constructor.
    if not 0 < data["default_bits"] <= MAX_BITS:
        _fail(f"{path.name}: default_bits must be in (0, {MAX_BITS}], got {data['default_bits']!r}.")
    for key in ("sink_tokens", "window"):
        if data[key] < 0:
            _fail(f"{path.name}: {key} must be >= 0, got {data[key]}.")
    for key in ("calibration", "measured"):
        if not isinstance(data.get(key, {}), dict):
            _fail(f"{path.name}: field {key!r} must be a JSON object.")
    return data


def expected_shapes(data: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    from .config import KINDS, tensor_name

    fp = data["fingerprint"]
    h, d = fp["num_key_value_heads"], fp["head_dim"]
    per = {
        "mean": ((h, d), "F32"),
        "basis": ((h, d, d), "F32"),
        "eigenvalues": ((h, d), "F32"),
        "weights": ((h, d), "F32"),
        "distortion": ((h, d, MAX_BITS + 1), "F32"),
        "codebooks": ((MAX_BITS, CODEBOOK_SIZE), "F32"),
        "bits": ((h, d), "U8"),
    }
    return {
        tensor_name(layer, kind, name): spec for layer in data["compressed_layers"] for kind in KINDS
        for name, spec in per.items()
    }


def check_header(path: Path, data: dict[str, Any]) -> None:
    """Check the safetensors header against the config before reading any tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            _fail(f"{path.name} is truncated (no safetensors header).")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or n + 8 > size:
            _fail(f"{path.name} has an implausible header size ({n} bytes for a {size}-byte file): corrupt file.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            _fail(f"{path.name} has a corrupt safetensors header.")
    if not isinstance(header, dict):
        _fail(f"{path.name} has a corrupt safetensors header (not a JSON object).")
    header.pop("__metadata__", None)
    expected = expected_shapes(data)
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing:
        _fail(f"{path.name} lacks tensors the config requires, e.g. {missing[0]!r} ({len(missing)} missing).")
    if extra:
        _fail(f"{path.name} has unexpected tensors, e.g. {extra[0]!r}: the config and tensors do not belong together.")
    end = 0
    for name, (shape, dtype) in expected.items():
        info = header[name]
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            _fail(f"{path.name}: tensor {name!r} has a corrupt header entry.")
        if info.get("dtype") != dtype:
            _fail(f"{path.name}: tensor {name!r} has dtype {info.get('dtype')}, expected {dtype}.")
        if tuple(info.get("shape", ())) != shape:
            _fail(f"{path.name}: tensor {name!r} has shape {tuple(info.get('shape', ()))}, expected {shape} "
                  "from the config's fingerprint.")
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        _fail(f"{path.name} is truncated: its header promises {8 + n + end} bytes, the file has {size}.")


def check_values(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    from .config import KINDS, tensor_name

    g = data["group_size"]
    for layer in data["compressed_layers"]:
        for kind in KINDS:
            def t(name: str, layer: int = layer, kind: str = kind) -> torch.Tensor:
                return tensors[tensor_name(layer, kind, name)]

            where = f"layer {layer} {'keys' if kind == 'k' else 'values'}"
            for name in ("mean", "basis", "eigenvalues", "weights", "distortion", "codebooks"):
                if not torch.isfinite(t(name)).all():
                    _fail(f"{where}: {name} contains NaN or infinite values.")
            u = t("basis").double()
            eye = torch.eye(u.shape[-1], dtype=torch.float64)
            err = (u.transpose(1, 2) @ u - eye).abs().max().item()
            if err > ORTHONORMAL_TOL:
                _fail(f"{where}: basis is not orthonormal (max |U^T U - I| = {err:.2e} > {ORTHONORMAL_TOL}).")
            lam = t("eigenvalues")
            if (lam < 0).any():
                _fail(f"{where}: eigenvalues must be non-negative.")
            if (lam[:, 1:] > lam[:, :-1] * (1 + 1e-5) + 1e-12).any():
                _fail(f"{where}: eigenvalues must be sorted in decreasing order.")
            if (t("weights") < 0).any() or (t("distortion") < 0).any():
                _fail(f"{where}: weights and distortion must be non-negative.")
            bits = t("bits")
            if int(bits.max()) > MAX_BITS:
                _fail(f"{where}: bits per coordinate must be in 0..{MAX_BITS}, found {int(bits.max())}.")
            for b in range(1, MAX_BITS + 1):
                counts = (bits == b).sum(-1)
                if (counts % g).any():
                    _fail(f"{where}: {b}-bit coordinates per head must come in multiples of {g}.")
            cb = t("codebooks")
            for b in range(1, MAX_BITS + 1):
                c = cb[b - 1, : 2**b]
                if (c[1:] < c[:-1]).any():
                    _fail(f"{where}: the {b}-bit codebook is not sorted.")


def load_validated(cls: Any, cfg_path: Path, tensors_path: Path, bits: float | None = None) -> Any:
    """Parse, verify and build a config; raise ``CalibrationFormatError`` with the reason on any problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path, tensors_path = Path(cfg_path), Path(tensors_path)
    data = read_config_json(cfg_path)
    for stray in sorted(cfg_path.parent.glob("*")):
        if stray.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}:
            # Never loaded, but worth a loud note: a calibration has no reason to ship pickles.
            import warnings

            warnings.warn(f"Ignoring {stray.name}: spectralkv never loads pickle files.", stacklevel=3)
    h = hashlib.sha256()
    with open(tensors_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != data["tensors_sha256"]:
        _fail(f"{tensors_path.name} does not match the sha256 recorded in the config: the file is corrupt or was "
              "replaced. Re-download or re-create the calibration.")
    check_header(tensors_path, data)
    try:
        tensors = load_file(str(tensors_path))
    except SafetensorError as e:  # safetensors' own consistency checks (offsets vs. shapes, overlaps)
        _fail(f"{tensors_path.name} could not be read ({e}): corrupt file.")
    check_values(tensors, data)
    cfg = cls(
        base_model=data["base_model"],
        fingerprint=data["fingerprint"],
        compressed_layers=list(data["compressed_layers"]),
        tensors=tensors,
        default_bits=float(data["default_bits"]),
        bits=bits,
        token_scale=data["token_scale"],
        key_weight=float(data["key_weight"]),
        sink_tokens=data["sink_tokens"],
        window=data["window"],
        group_size=data["group_size"],
        base_model_revision=data.get("base_model_revision"),
        calibration=data.get("calibration", {}),
        measured=data.get("measured", {}),
        format_version=data["format_version"],
        spectralkv_version=data.get("spectralkv_version", "unknown"),
    )
    spent = sum(int(cfg.tensor(l, k, "bits").long().sum()) for l in cfg.compressed_layers for k in ("k", "v"))
    if spent > cfg.code_bits_for(cfg.default_bits):
        _fail(f"The stored allocation spends {spent} code bits per token, more than default_bits="
              f"{cfg.default_bits} allows ({cfg.code_bits_for(cfg.default_bits)}): budget mismatch.")
    return cfg
