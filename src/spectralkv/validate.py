"""Validation of calibration artifacts, which are untrusted input (they may come from anyone on the Hub).

Every check is a named step (:data:`STEPS`). :func:`load_validated` (behind ``SpectralKVConfig.from_pretrained``)
runs them in order and raises ``CalibrationFormatError`` on the first failure; :func:`validate_calibration` (behind
``spectralkv validate``) runs every step whose prerequisites passed and returns a :class:`ValidationReport` showing
the very same messages, one line per check.

Order matters: the JSON config is parsed and checked first (format version, older formats upgraded through
:mod:`spectralkv.formats`, then the schema), then the safetensors *header* (names, dtypes, shapes, total size) before
any tensor byte is read, then the sha256 recorded in the config, then the tensor values (finite, orthonormal bases,
sorted non-negative eigenvalues, bits in range and within budget, sorted codebooks). Pickle-format files beside the
tensors are reported (by ``from_pretrained`` as a warning), never opened. Nothing here unpickles or executes anything.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from .codebook import CODEBOOK_SIZE, MAX_BITS

MAX_HEADER_BYTES = 16 * 1024 * 1024
ORTHONORMAL_TOL = 1e-3
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DTYPE_BYTES = {"F32": 4, "U8": 1}
REQUIRED = {
    "format_version": int,
    "base_model": str,
    "fingerprint": dict,
    "compressed_layers": list,
    "default_bits": (int, float),
    "token_scale": bool,
    "scale_format": str,
    "key_weight": (int, float),
    "outlier_threshold": (int, float, type(None)),
    "outlier_fraction": (int, float),
    "sink_tokens": int,
    "window": int,
    "group_size": int,
    "head_group": int,
    "weight_profiles": list,
    "position_centring": (str, type(None)),
    "tensors_sha256": str,
}
FINGERPRINT_INT_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")


def _fail(msg: str) -> NoReturn:
    from .config import CalibrationFormatError

    raise CalibrationFormatError(msg)


# -- the config JSON ------------------------------------------------------------------------------------------------
def parse_config_json(path: Path) -> dict[str, Any]:
    """Parse the config file into a dict (no field checks)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(f"{path.name} is not valid JSON ({e}); the calibration is corrupt, re-download or re-create it.")
    if not isinstance(data, dict):
        _fail(f"{path.name} must hold a JSON object.")
    return data


def check_schema(data: dict[str, Any], filename: str) -> None:
    """Required fields, their types and ranges, in a config already upgraded to the current format."""
    for key, typ in REQUIRED.items():
        if key not in data:
            _fail(f"{filename} is missing the required field {key!r}.")
        if not isinstance(data[key], typ) or (typ is int and isinstance(data[key], bool)):
            _fail(f"{filename}: field {key!r} has the wrong type ({type(data[key]).__name__}).")
    fp = data["fingerprint"]
    for key in FINGERPRINT_INT_FIELDS:
        if not isinstance(fp.get(key), int) or fp[key] <= 0:
            _fail(f"{filename}: fingerprint field {key!r} must be a positive integer, got {fp.get(key)!r}.")
    layers = data["compressed_layers"]
    if not layers:
        _fail(f"{filename}: compressed_layers is empty; a calibration compresses at least one layer.")
    if not all(isinstance(i, int) and 0 <= i < fp["num_hidden_layers"] for i in layers) or len(set(layers)) != len(
        layers
    ):
        _fail(f"{filename}: compressed_layers must be distinct layer indices below num_hidden_layers.")
    if data["group_size"] <= 0 or fp["head_dim"] % data["group_size"]:
        _fail(f"{filename}: group_size {data['group_size']} must be positive and divide head_dim {fp['head_dim']}.")
    # Checked here so a bad artifact is a CalibrationFormatError, not a ValueError from the config's constructor.
    g = data["head_group"]
    if g <= 0 or fp["num_key_value_heads"] % g:
        _fail(f"{filename}: head_group {g} (KV heads per basis) must be positive and divide num_key_value_heads "
              f"{fp['num_key_value_heads']}; the calibration is corrupt: re-download or re-create it.")
    if not 0 < data["default_bits"] <= MAX_BITS:
        _fail(f"{filename}: default_bits must be in (0, {MAX_BITS}], got {data['default_bits']!r}.")
    t, f = data["outlier_threshold"], data["outlier_fraction"]
    bad_t = t is not None and (isinstance(t, bool) or not 0 < t < float("inf"))
    if bad_t or isinstance(f, bool) or not 0 <= f <= 1:
        _fail(f"{filename}: outlier_threshold must be positive or null and outlier_fraction in [0, 1], got {t!r} "
              f"and {f!r}; the calibration is corrupt: re-download it or re-create it with `spectralkv calibrate`.")
    from .positions import POSITION_CENTRINGS

    if data.get("position_centring") not in POSITION_CENTRINGS:
        _fail(f"{filename}: position_centring must be one of {POSITION_CENTRINGS}, got "
              f"{data.get('position_centring')!r}; the calibration is corrupt or from a newer spectralkv.")
    from .scales import SCALE_FORMATS

    if data["scale_format"] not in SCALE_FORMATS:
        _fail(f"{filename}: scale_format must be one of {SCALE_FORMATS}, got {data['scale_format']!r}; the "
              "calibration is corrupt or from a newer spectralkv.")
    for key in ("sink_tokens", "window"):
        if data[key] < 0:
            _fail(f"{filename}: {key} must be >= 0, got {data[key]}.")
    from .config import check_weight_profiles

    try:
        check_weight_profiles(data["weight_profiles"], len(layers), float(data["default_bits"]))
    except ValueError as e:
        _fail(f"{filename}: {e} The calibration is corrupt: re-download it or re-create it with "
              "`spectralkv calibrate`.")
    for key in ("calibration", "measured"):
        if not isinstance(data.get(key, {}), dict):
            _fail(f"{filename}: field {key!r} must be a JSON object.")


def read_config_json(path: Path) -> dict[str, Any]:
    """Parse, upgrade (older formats) and check the config file; the three first steps of :data:`STEPS` at once."""
    from .formats import upgrade

    data, _ = upgrade(parse_config_json(path), path.name)
    check_schema(data, path.name)
    return data


def expected_shapes(data: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    from .config import KINDS, tensor_name

    fp = data["fingerprint"]
    g = data.get("head_group", 1)
    h, d = fp["num_key_value_heads"] // g, fp["head_dim"] * g  # bases per layer and their dimension
    per = {
        "mean": ((h, d), "F32"),
        "basis": ((h, d, d), "F32"),
        "eigenvalues": ((h, d), "F32"),
        "weights": ((h, d), "F32"),
        "distortion": ((h, d, MAX_BITS + 1), "F32"),
        "codebooks": ((MAX_BITS, CODEBOOK_SIZE), "F32"),
        "bits": ((h, d), "U8"),
    }
    out = {
        tensor_name(layer, kind, name): spec for layer in data["compressed_layers"] for kind in KINDS
        for name, spec in per.items()
    }
    if data.get("position_centring") is not None:
        from .config import ROPE_FREQUENCIES

        out[ROPE_FREQUENCIES] = ((fp["head_dim"],), "F32")  # per head, as the model rotates
        out.update({tensor_name(layer, "k", "position_mean"): ((fp["num_key_value_heads"], fp["head_dim"]), "F32")
                    for layer in data["compressed_layers"]})
    if _log8(data):
        from .config import SCALE_RANGE

        out.update({tensor_name(layer, kind, SCALE_RANGE): ((2,), "F32") for layer in data["compressed_layers"]
                    for kind in KINDS})
    return out


def _log8(data: dict[str, Any]) -> bool:
    """Whether the calibration stores log8 per-token scales (and so their ranges)."""
    return data.get("scale_format") == "log8"


def expected_data_bytes(data: dict[str, Any]) -> int:
    """Bytes of tensor data the config's fingerprint implies (the size bound of the tensors file, header aside)."""
    return sum(math.prod(shape) * DTYPE_BYTES[dtype] for shape, dtype in expected_shapes(data).values())


# -- the safetensors file -------------------------------------------------------------------------------------------
def check_header(path: Path, data: dict[str, Any]) -> None:
    """Check the safetensors header against the config before reading any tensor data: names, dtypes, shapes, and
    a total size bounded by what the fingerprint implies."""
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
    bound = expected_data_bytes(data)
    if end > bound:
        _fail(f"{path.name}: its header spans {end} bytes of tensor data, more than the {bound} bytes the config's "
              "fingerprint implies: corrupt file.")
    if 8 + n + end < size:
        _fail(f"{path.name} has {size - 8 - n - end} unexpected bytes after its tensors: corrupt or tampered file.")


def check_sha256(path: Path, data: dict[str, Any]) -> None:
    from .config import file_sha256

    if file_sha256(path) != data["tensors_sha256"]:
        _fail(f"{path.name} does not match the sha256 recorded in the config: the file is corrupt or was "
              "replaced. Re-download or re-create the calibration.")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read the tensors (safetensors only; call after :func:`check_header`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:  # safetensors' own consistency checks (offsets vs. shapes, overlaps)
        _fail(f"{path.name} could not be read ({e}): corrupt file.")


# -- tensor values --------------------------------------------------------------------------------------------------
def _layers(tensors: dict[str, torch.Tensor], data: dict[str, Any]
            ) -> Iterator[tuple[str, Callable[[str], torch.Tensor]]]:
    """``(where, tensor getter)`` for every compressed layer and K/V, in file order."""
    from .config import KINDS, tensor_name

    for layer in data["compressed_layers"]:
        for kind in KINDS:
            def t(name: str, layer: int = layer, kind: str = kind) -> torch.Tensor:
                return tensors[tensor_name(layer, kind, name)]

            yield f"layer {layer} {'keys' if kind == 'k' else 'values'}", t


def check_finite(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    positioned = data.get("position_centring") is not None
    for where, t in _layers(tensors, data):
        names = ["mean", "basis", "eigenvalues", "weights", "distortion", "codebooks"]
        if positioned and where.endswith("keys"):
            names.append("position_mean")
        if _log8(data):
            names.append("scale_range")
        for name in names:
            if not torch.isfinite(t(name)).all():
                _fail(f"{where}: {name} contains NaN or infinite values.")
        if _log8(data):
            lo, hi = t("scale_range").tolist()
            if not lo < hi:
                _fail(f"{where}: scale_range [lo, hi] must have lo < hi, got [{lo:g}, {hi:g}]; the calibration is "
                      "corrupt: re-download or re-create it.")
    if positioned:
        from .config import ROPE_FREQUENCIES
        from .positions import check_frequencies

        try:
            check_frequencies(tensors[ROPE_FREQUENCIES], data["fingerprint"]["head_dim"])
        except ValueError as e:
            _fail(f"{ROPE_FREQUENCIES}: {e} The calibration is corrupt: re-download or re-create it.")


def check_orthonormal(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    for where, t in _layers(tensors, data):
        u = t("basis").double()
        eye = torch.eye(u.shape[-1], dtype=torch.float64)
        err = (u.transpose(1, 2) @ u - eye).abs().max().item()
        if not err <= ORTHONORMAL_TOL:  # `not <=` so a NaN fails too
            _fail(f"{where}: basis is not orthonormal (max |U^T U - I| = {err:.2e} > {ORTHONORMAL_TOL}).")


def check_eigenvalues(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    for where, t in _layers(tensors, data):
        lam = t("eigenvalues")
        if (lam < 0).any():
            _fail(f"{where}: eigenvalues must be non-negative.")
        if (lam[:, 1:] > lam[:, :-1] * (1 + 1e-5) + 1e-12).any():
            _fail(f"{where}: eigenvalues must be sorted in decreasing order.")


def check_non_negative(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    for where, t in _layers(tensors, data):
        if (t("weights") < 0).any() or (t("distortion") < 0).any():
            _fail(f"{where}: weights and distortion must be non-negative.")


def check_bits(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    g = data["group_size"]
    for where, t in _layers(tensors, data):
        bits = t("bits")
        if int(bits.max()) > MAX_BITS:
            _fail(f"{where}: bits per coordinate must be in 0..{MAX_BITS}, found {int(bits.max())}.")
        for b in range(1, MAX_BITS + 1):
            counts = (bits == b).sum(-1)
            if (counts % g).any():
                _fail(f"{where}: {b}-bit coordinates per basis must come in multiples of {g}.")


def check_codebooks(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    for where, t in _layers(tensors, data):
        cb = t("codebooks")
        for b in range(1, MAX_BITS + 1):
            c = cb[b - 1, : 2**b]
            if (c[1:] < c[:-1]).any():
                _fail(f"{where}: the {b}-bit codebook is not sorted.")


def check_values(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    """Every value check, in :data:`STEPS` order."""
    for check in (check_finite, check_orthonormal, check_eigenvalues, check_non_negative, check_bits,
                  check_codebooks):
        check(tensors, data)


def build_config(cls: Any, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> Any:
    """The config object, at its default budget (a constructor refusal is an artifact error here)."""
    try:
        return cls(
            base_model=data["base_model"],
            fingerprint=data["fingerprint"],
            compressed_layers=list(data["compressed_layers"]),
            tensors=tensors,
            default_bits=float(data["default_bits"]),
            token_scale=data["token_scale"],
            scale_format=data["scale_format"],
            key_weight=float(data["key_weight"]),
            outlier_threshold=None if data["outlier_threshold"] is None else float(data["outlier_threshold"]),
            outlier_fraction=float(data["outlier_fraction"]),
            position_centring=data["position_centring"],
            sink_tokens=data["sink_tokens"],
            window=data["window"],
            group_size=data["group_size"],
            head_group=data["head_group"],
            weight_profiles=data["weight_profiles"],
            base_model_revision=data.get("base_model_revision"),
            calibration=data.get("calibration", {}),
            measured=data.get("measured", {}),
            format_version=data["format_version"],
            spectralkv_version=data.get("spectralkv_version", "unknown"),
        )
    except ValueError as e:
        _fail(f"The calibration's settings are inconsistent: {e}")


def check_budget_spent(cfg: Any) -> None:
    spent = sum(int(cfg.tensor(l, k, "bits").long().sum()) for l in cfg.compressed_layers for k in ("k", "v"))
    if spent > cfg.code_bits_for(cfg.default_bits):
        _fail(f"The stored allocation spends {spent} code bits per token, more than default_bits="
              f"{cfg.default_bits} allows ({cfg.code_bits_for(cfg.default_bits)}): budget mismatch.")


def pickle_files(names: list[str]) -> list[str]:
    return sorted(n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES)


def check_no_pickles(names: list[str]) -> None:
    found = pickle_files(names)
    if found:
        _fail(f"Ignoring {', '.join(found)}: spectralkv never loads pickle files, and a calibration has no reason to "
              "ship them; delete them before publishing.")


# -- the steps, and running them ------------------------------------------------------------------------------------
@dataclass
class Artifact:
    """What the steps read and fill in, in order: the files, then the parsed config, tensors and config object."""

    cfg_path: Path
    tensors_path: Path
    cls: Any = None
    files: list[str] | None = None  # every file of the calibration (a Hub repo's listing); default: the folder's
    model: Any = None
    data: dict[str, Any] = field(default_factory=dict)
    original_version: int | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: Any = None


@dataclass(frozen=True)
class Step:
    """A named check: ``run`` raises ``CalibrationFormatError`` on failure and returns a short note on success.
    It runs only once every step named in ``needs`` has passed."""

    name: str
    run: Callable[[Artifact], str]
    needs: tuple[str, ...] = ()


def _step_pickles(a: Artifact) -> str:
    names = a.files if a.files is not None else [p.name for p in a.cfg_path.parent.iterdir() if p.is_file()]
    check_no_pickles(names)
    return f"{len(names)} file(s) looked at by name only"


def _step_json(a: Artifact) -> str:
    a.data = parse_config_json(a.cfg_path)
    return a.cfg_path.name


def _step_format(a: Artifact) -> str:
    from .formats import describe, upgrade

    a.data, a.original_version = upgrade(a.data, a.cfg_path.name)
    return describe(a.original_version)


def _step_schema(a: Artifact) -> str:
    check_schema(a.data, a.cfg_path.name)
    fp = a.data["fingerprint"]
    profiles = ", ".join(f"{p['bits']:g}" for p in a.data["weight_profiles"]) or "none"
    return (f"{fp.get('model_type', '?')}: {len(a.data['compressed_layers'])} compressed of "
            f"{fp['num_hidden_layers']} layers, {fp['num_key_value_heads']} KV heads x {fp['head_dim']}; "
            f"weights re-fitted at: {profiles}")


def _step_header(a: Artifact) -> str:
    check_header(a.tensors_path, a.data)
    return f"{len(expected_shapes(a.data))} tensors, {a.tensors_path.stat().st_size} bytes"


def _step_sha(a: Artifact) -> str:
    check_sha256(a.tensors_path, a.data)
    return a.data["tensors_sha256"][:16] + "..."


def _step_read(a: Artifact) -> str:
    a.tensors = read_tensors(a.tensors_path)
    return "read with safetensors"


def _value_step(check: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> Callable[[Artifact], str]:
    def run(a: Artifact) -> str:
        check(a.tensors, a.data)
        return ""

    return run


def _step_budget(a: Artifact) -> str:
    a.config = build_config(a.cls, a.tensors, a.data)
    check_budget_spent(a.config)
    return (f"default {a.config.default_bits:g} bits/coordinate, "
            f"{a.config.effective_bits(a.config.default_bits):.3f} stored")


def _step_fingerprint(a: Artifact) -> str:
    a.config.check_compatible(a.model)
    return "matches the model"


_HEADER = ("safetensors header",)
_VALUES = ("tensor data", "finite values")
STEPS: tuple[Step, ...] = (
    Step("no pickle files", _step_pickles),
    Step("config JSON", _step_json),
    Step("format version", _step_format, ("config JSON",)),
    Step("config schema", _step_schema, ("format version",)),
    Step("safetensors header", _step_header, ("config schema",)),
    Step("sha256", _step_sha, ("config schema",)),
    Step("tensor data", _step_read, _HEADER),
    Step("finite values", _value_step(check_finite), ("tensor data",)),
    Step("orthonormal bases", _value_step(check_orthonormal), _VALUES),
    Step("eigenvalues", _value_step(check_eigenvalues), _VALUES),
    Step("weights and distortion", _value_step(check_non_negative), _VALUES),
    Step("bits", _value_step(check_bits), _VALUES),
    Step("codebooks", _value_step(check_codebooks), _VALUES),
    Step("budget", _step_budget, ("bits", "weights and distortion", "eigenvalues")),
)
FINGERPRINT_STEP = Step("fingerprint", _step_fingerprint, ("budget",))
WARN_ONLY_ON_LOAD = ("no pickle files",)  # from_pretrained never opens them: a warning, not a refusal


def load_validated(cls: Any, cfg_path: Path, tensors_path: Path, bits: float | None = None) -> Any:
    """Parse, verify and build a config; raise ``CalibrationFormatError`` with the reason on the first problem.
    A sha256 mismatch is found only after the header has been checked (cheap, and it bounds the file size)."""
    from .config import CalibrationFormatError

    a = Artifact(Path(cfg_path), Path(tensors_path), cls)
    for step in STEPS:
        try:
            step.run(a)
        except CalibrationFormatError as e:
            if step.name not in WARN_ONLY_ON_LOAD:
                raise
            warnings.warn(str(e), stacklevel=3)
    return a.config if bits is None else a.config.with_bits(bits)


# -- the report -----------------------------------------------------------------------------------------------------
PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass(frozen=True)
class CheckResult:
    """One named check: ``status`` is ``"pass"``, ``"fail"`` or ``"skip"``; ``message`` says why."""

    name: str
    status: str
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASS


@dataclass
class ValidationReport:
    """Every check run on one calibration, in order. ``ok`` when none failed."""

    source: str
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == FAIL]

    def __getitem__(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "ok": self.ok,
                "checks": [{"name": c.name, "status": c.status, "message": c.message} for c in self.checks]}

    def format(self) -> str:
        width = max(len(c.name) for c in self.checks) if self.checks else 0
        lines = [f"spectralkv validate {self.source}"]
        for c in self.checks:
            lines.append(f"  {c.status.upper():4}  {c.name:<{width}}  {c.message}".rstrip())
        n = len(self.failures)
        lines.append("PASS: every check passed." if self.ok else
                     f"FAIL: {n} of {len(self.checks)} checks failed; this calibration would be refused.")
        return "\n".join(lines)

    __str__ = format


def run_checks(artifact: Artifact, steps: tuple[Step, ...]) -> list[CheckResult]:
    """Run every step whose prerequisites passed; failures and skips are recorded, not raised."""
    from .config import CalibrationFormatError
    from .fingerprint import IncompatibleCalibrationError, UnsupportedArchitectureError

    status: dict[str, str] = {}
    out = []
    for step in steps:
        blocked = [n for n in step.needs if status.get(n) != PASS]
        if blocked:
            result = CheckResult(step.name, SKIP, f"not run: needs {', '.join(repr(n) for n in blocked)} to pass")
        else:
            try:
                result = CheckResult(step.name, PASS, step.run(artifact))
            except (CalibrationFormatError, IncompatibleCalibrationError, UnsupportedArchitectureError) as e:
                result = CheckResult(step.name, FAIL, str(e))
        status[step.name] = result.status
        out.append(result)
    return out


def _model_config(model: Any, gguf_file: str | None = None) -> Any:
    """A model object or config as is; a Hub id or folder -> its config (weights are not loaded)."""
    if not isinstance(model, str):
        return model
    from transformers import AutoConfig

    from .models import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, default_model_path

    if model == DEFAULT_MODEL:
        model, gguf_file = default_model_path()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoConfig.from_pretrained(model, **kwargs)
    except OSError:
        if model != DEFAULT_MODEL_HUB_ID:
            raise
        folder, gguf = default_model_path()  # not cached from the Hub: the embedded copy has the same config
        return AutoConfig.from_pretrained(folder, gguf_file=gguf)


def _hub_listing(repo_id: str, subfolder: str | None, revision: str | None, token: Any) -> list[str] | None:
    """The repo's file names (under ``subfolder``), or None when the Hub cannot be asked (offline)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except (HfHubHTTPError, OSError):
        return None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]


def validate_calibration(
    path_or_repo: str | Path,
    model: Any = None,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> ValidationReport:
    """Check a calibration folder or Hub repo without trusting it, and report every check by name.

    The same checks ``SpectralKVConfig.from_pretrained`` runs (with the same messages), plus: pickle-format files
    in the folder (or, online, anywhere at the top of the repo's subfolder) fail the report, and with ``model`` (a
    model, a config, a Hub id or a folder; only its config is read) the architecture fingerprint is compared.
    Keyword arguments are huggingface_hub's download options. Never raises for a bad artifact: read ``report.ok``.
    """
    from .config import CONFIG_NAME, TENSORS_NAME, CalibrationFormatError, SpectralKVConfig, _resolve_files

    source = str(path_or_repo)
    report = ValidationReport(source)
    try:
        cfg_path, tensors_path = _resolve_files(source, revision, subfolder, cache_dir, local_files_only, token)
    except CalibrationFormatError as e:
        report.checks.append(CheckResult("files", FAIL, str(e)))
        report.checks += [CheckResult(s.name, SKIP, "not run: needs 'files' to pass") for s in STEPS]
        return report
    report.checks.append(CheckResult("files", PASS, f"{CONFIG_NAME}, {TENSORS_NAME} in {cfg_path.parent}"))
    is_local = Path(source, subfolder or "").is_dir()
    files = None if is_local else _hub_listing(source, subfolder, revision, token)
    artifact = Artifact(cfg_path, tensors_path, SpectralKVConfig, files=files)
    steps = STEPS
    if model is not None:
        try:
            artifact.model = _model_config(model, gguf_file)
        except (OSError, ValueError) as e:
            report.checks += run_checks(artifact, steps)
            report.checks.append(CheckResult("fingerprint", FAIL, f"Could not read the model's config: {e}"))
            return report
        steps = (*steps, FINGERPRINT_STEP)
    report.checks += run_checks(artifact, steps)
    if model is None:
        report.checks.append(CheckResult("fingerprint", SKIP, "no model given (pass --model to compare)"))
    return report


__all__ = ["STEPS", "CheckResult", "ValidationReport", "load_validated", "validate_calibration"]
