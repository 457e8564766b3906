"""``SpectralKVConfig``: a calibration (JSON config + safetensors tensors + model card) and its Hub round-trip.

A calibration folder is a Hugging Face Hub repo::

    spectralkv_config.json    format/library version, base model, architecture fingerprint, provenance, choices
    spectralkv.safetensors    per-layer tensors (basis, mean, eigenvalues, weights, distortion, codebooks, bits)
    README.md                 model card rendered from hub_cards/

Only JSON and safetensors are ever read: never pickle. Everything is validated before use.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .allocation import GROUP_SIZE, allocate, check_budget
from .codebook import MAX_BITS
from .fingerprint import (
    IncompatibleCalibrationError,
    check_supported,
    fingerprint,
    mismatches,
)
from .formats import FORMAT_VERSION
from .scales import FP16, ScaleCodec, check_scale_format

CONFIG_NAME = "spectralkv_config.json"
TENSORS_NAME = "spectralkv.safetensors"
CARD_NAME = "README.md"
KINDS = ("k", "v")
TENSOR_FIELDS = ("mean", "basis", "eigenvalues", "weights", "distortion", "codebooks", "bits")
ROPE_FREQUENCIES = "rope.frequencies"  # [D], with position_centring="rope" (keys also have "position_mean")
SCALE_RANGE = "scale_range"  # per layer and K/V: [lo, hi] log2 range of a log8 per-token scale


class CalibrationFormatError(ValueError):
    """A calibration folder or repo is missing files, corrupt, or inconsistent."""


def tensor_name(layer: int, kind: str, field_name: str) -> str:
    return f"layers.{layer}.{kind}.{field_name}"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (the tensors file can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class SpectralKVConfig:
    """A calibration of one model: what to rotate by, how to code each coordinate, and how many bits to spend.

    Args:
        base_model: Hub id (or path) of the model this calibration was made for.
        fingerprint: architecture fields the tensors depend on (see :mod:`spectralkv.fingerprint`).
        compressed_layers: indices of the layers whose cache is compressed (full-attention layers).
        tensors: per-layer tensors, named ``layers.{i}.{k|v}.{field}``.
        default_bits: the budget (bits per coordinate over K and V, scales included) ``bits`` was allocated for.
        bits: the active budget; any value in (0, 8] that the calibration can serve (re-allocated on demand).
        token_scale: whether each token/head stores a scale (chosen at calibration by measured error).
        scale_format: how a per-token scale is stored (:mod:`spectralkv.scales`): ``"fp16"``, or ``"log8"``, one
            byte on a log scale over a calibrated range (tensors ``layers.{i}.{k|v}.scale_range``).
        key_weight: relative weight of key vs value distortion chosen at calibration by measured error.
        outlier_threshold: coordinates beyond this many standard deviations are kept exactly (dense-and-sparse;
            chosen at calibration by measured error, None: off).
        outlier_fraction: fraction of compressed coordinates beyond the threshold on held-out calibration text; the
            allocation reserves its expected bits so the budget holds all-in.
        position_centring: ``"rope"``: keys are centred on their pre-RoPE mean rotated to each token's position
            (tensors ``layers.{i}.k.position_mean`` and ``rope.frequencies``; see :mod:`spectralkv.positions`);
            None: on their post-RoPE mean.
        weight_profiles: per other calibrated budget, ``{"bits": b, "factors": [[key, value] per compressed
            layer]}``: how much the per-layer K/V weights re-fitted at ``b`` differ from the stored ones (which serve
            ``default_bits``); a budget is allocated with the weights of the nearest calibrated budget.
        sink_tokens: leading tokens kept in full precision.
        window: recent tokens kept in full precision by default.
        head_group: KV heads coded in one basis (their coordinates side by side; 1: a basis per head). The
            per-layer tensors then describe ``num_kv_heads / head_group`` bases of dimension ``head_group *
            head_dim`` (``position_mean`` and ``rope.frequencies`` stay per head).
        calibration: provenance (text source, token counts, sequence length, seed).
        measured: figures measured at calibration (spectra, chosen split, held-out errors).
    """

    base_model: str
    fingerprint: dict[str, Any]
    compressed_layers: list[int]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    default_bits: float
    bits: float | None = None
    token_scale: bool = True
    scale_format: str = "fp16"
    key_weight: float = 1.0
    outlier_threshold: float | None = None
    outlier_fraction: float = 0.0
    position_centring: str | None = None
    sink_tokens: int = 4
    window: int = 32
    group_size: int = GROUP_SIZE
    head_group: int = 1
    weight_profiles: list[dict[str, Any]] = field(default_factory=list)
    base_model_revision: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    spectralkv_version: str = __version__

    def __post_init__(self) -> None:
        self.default_bits = check_budget(self.default_bits)
        self.bits = self.default_bits if self.bits is None else check_budget(self.bits)
        if self.sink_tokens < 0:
            raise ValueError(f"`sink_tokens` must be >= 0, got {self.sink_tokens}.")
        if self.window < 0:
            raise ValueError(f"`window` must be >= 0, got {self.window}.")
        check_head_group(self.head_group, self.num_kv_heads)
        if self.outlier_threshold is not None and not self.outlier_threshold > 0:
            raise ValueError(f"`outlier_threshold` must be > 0 or None, got {self.outlier_threshold!r}.")
        if not 0 <= self.outlier_fraction <= 1:
            raise ValueError(f"`outlier_fraction` must be in [0, 1], got {self.outlier_fraction!r}.")
        if self.outlier_threshold is None:
            self.outlier_fraction = 0.0
        from .positions import POSITION_CENTRINGS

        if self.position_centring not in POSITION_CENTRINGS:
            raise ValueError(f"`position_centring` must be one of {POSITION_CENTRINGS}, got "
                             f"{self.position_centring!r}.")
        if self.position_centring is not None:
            needed = [ROPE_FREQUENCIES] + [tensor_name(l, "k", "position_mean") for l in self.compressed_layers]
            missing = [n for n in needed if n not in self.tensors]
            if missing:
                raise ValueError(f"position_centring={self.position_centring!r} needs the tensor {missing[0]!r}.")
        check_scale_format(self.scale_format)
        if self.scale_format == "log8":
            missing = [n for l in self.compressed_layers for k in KINDS
                       if (n := tensor_name(l, k, SCALE_RANGE)) not in self.tensors]
            if missing:
                raise ValueError(f"scale_format='log8' needs the tensor {missing[0]!r} (the scale's log2 range).")
            self._scale_codecs = {(l, k): ScaleCodec("log8", tuple(self.tensor(l, k, SCALE_RANGE).tolist()))
                                  for l in self.compressed_layers for k in KINDS}
        else:
            self._scale_codecs = {}
        self.weight_profiles = check_weight_profiles(self.weight_profiles, len(self.compressed_layers),
                                                     self.default_bits)
        self._alloc_cache: dict[float, dict[tuple[int, str], torch.Tensor]] = {}
        self._stored_allocation = True  # the ``bits`` tensors serve ``default_bits`` with these outlier settings
        if self.bits < self.min_bits:
            raise ValueError(self._budget_too_small(self.bits))

    # -- geometry ---------------------------------------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        return int(self.fingerprint["num_key_value_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.fingerprint["head_dim"])

    @property
    def num_bases(self) -> int:
        """Bases per layer and K/V (``num_kv_heads / head_group``)."""
        return self.num_kv_heads // self.head_group

    @property
    def basis_dim(self) -> int:
        """Dimension of one basis (``head_group * head_dim``)."""
        return self.head_group * self.head_dim

    @property
    def coords_per_token(self) -> int:
        """Coordinates per token over all compressed layers, K and V."""
        return 2 * len(self.compressed_layers) * self.num_kv_heads * self.head_dim

    @property
    def scale_bits_per_token(self) -> int:
        """Bits of the per-token scales over all compressed layers, K and V (0 without them)."""
        if not self.token_scale:
            return 0
        return self.scale_codec(self.compressed_layers[0], "k").bits * 2 * len(self.compressed_layers) \
            * self.num_bases

    def scale_codec(self, layer: int, kind: str) -> ScaleCodec:
        """How ``layer``'s keys or values store their per-token scale (meaningful with ``token_scale``)."""
        return self._scale_codecs.get((layer, kind), FP16)

    @property
    def outlier_bits_per_token(self) -> float:
        """Expected bits per token of the exact outliers (per-token counts + entries), over all compressed layers."""
        if self.outlier_threshold is None:
            return 0.0
        from .quantizer import outlier_count_bits, outlier_entry_bits

        coords = self.num_kv_heads * self.head_dim
        return (outlier_count_bits(coords) * 2 * len(self.compressed_layers)
                + self.outlier_fraction * self.coords_per_token * outlier_entry_bits(coords))

    @property
    def outlier_cap(self) -> int | None:
        """Most outliers kept per token per layer and K/V: 4x the calibration's average (at least 2), so text unlike
        the calibration's (e.g. positions far beyond its sequence length) cannot blow the budget up unboundedly."""
        if self.outlier_threshold is None:
            return None
        return max(2, math.ceil(4 * self.outlier_fraction * self.num_kv_heads * self.head_dim))

    @property
    def min_bits(self) -> float:
        """Smallest budget this calibration can serve (the per-token scales and expected outliers alone)."""
        return (self.scale_bits_per_token + self.outlier_bits_per_token) / self.coords_per_token

    def _budget_too_small(self, bits: float) -> str:
        return (
            f"A budget of {bits} bits per coordinate is too small for this calibration: its per-token scales "
            f"and exact outliers alone cost {self.min_bits:.3f} bits per coordinate. Choose a budget above "
            f"{self.min_bits:.3f}."
        )

    def tensor(self, layer: int, kind: str, name: str) -> torch.Tensor:
        return self.tensors[tensor_name(layer, kind, name)]

    # -- allocation -------------------------------------------------------------------------------------------
    def allocation(self, bits: float | None = None) -> dict[tuple[int, str], torch.Tensor]:
        """Bits per coordinate ``[H, D]`` for every (layer, kind) at budget ``bits`` (default: the active budget)."""
        b = check_budget(self.bits if bits is None else bits)
        if b < self.min_bits:
            raise ValueError(self._budget_too_small(b))
        if b == self.default_bits and self._stored_allocation:
            return {(l, k): self.tensor(l, k, "bits") for l in self.compressed_layers for k in KINDS}
        if b not in self._alloc_cache:
            self._alloc_cache[b] = allocate(self.weighted_distortion(b), self.code_bits_for(b), self.group_size)
        return self._alloc_cache[b]

    def profile_bits(self, bits: float) -> float:
        """The calibrated budget whose weights serve budget ``bits``: the nearest one (the lower on a tie)."""
        budgets = sorted({self.default_bits, *(float(p["bits"]) for p in self.weight_profiles)})
        return min(budgets, key=lambda c: (abs(c - bits), c))

    def code_bits_for(self, bits: float) -> int:
        """Code bits per token available at budget ``bits`` once the scales and expected outliers are paid for."""
        return int(bits * self.coords_per_token - self.outlier_bits_per_token + 1e-9) - self.scale_bits_per_token

    def weighted_distortion(self, bits: float | None = None) -> dict[tuple[int, str], torch.Tensor]:
        """``[H, D, 9]`` per (layer, kind): importance weight x eigenvalue x measured codebook MSE, with the weights
        of the calibrated budget nearest ``bits`` (None: the stored weights, which serve ``default_bits``)."""
        factors: dict[tuple[int, str], float] = {}
        if bits is not None:
            chosen = self.profile_bits(bits)
            for p in self.weight_profiles:
                if float(p["bits"]) == chosen:
                    factors = {(l, k): float(f[i]) for l, f in zip(self.compressed_layers, p["factors"], strict=True)
                               for i, k in enumerate(KINDS)}
        out = {}
        for l in self.compressed_layers:
            for k in KINDS:
                w = self.tensor(l, k, "weights").double() * self.tensor(l, k, "eigenvalues").double().clamp_min(0)
                out[(l, k)] = w.unsqueeze(-1) * self.tensor(l, k, "distortion").double() * factors.get((l, k), 1.0)
        return out

    def effective_bits(self, bits: float | None = None) -> float:
        """Bits per coordinate stored at budget ``bits`` (codes + scales + expected outliers): at most the budget."""
        alloc = self.allocation(bits)
        code = sum(int(t.long().sum()) for t in alloc.values())
        return (code + self.scale_bits_per_token + self.outlier_bits_per_token) / self.coords_per_token

    def kv_split(self, bits: float | None = None) -> dict[str, float]:
        """Average code bits per coordinate for keys and for values at budget ``bits``."""
        alloc = self.allocation(bits)
        out = {}
        for k, name in (("k", "key_bits"), ("v", "value_bits")):
            ts = [t.double() for (_, kk), t in alloc.items() if kk == k]
            out[name] = float(torch.stack([t.mean() for t in ts]).mean()) if ts else 0.0
        return out

    def quantizers(self, bits: float | None = None) -> dict[tuple[int, str], Any]:
        """One :class:`~spectralkv.quantizer.SpectralQuantizer` per (layer, kind) at budget ``bits``."""
        from .quantizer import SpectralQuantizer

        alloc = self.allocation(bits)
        positioned = self.position_centring is not None

        def position_terms(l: int, k: str) -> dict[str, torch.Tensor]:
            if not (positioned and k == "k"):
                return {}
            return {"position_mean": self.tensor(l, k, "position_mean"), "frequencies": self.tensors[ROPE_FREQUENCIES]}

        def scale_range(l: int, k: str) -> tuple[float, float] | None:
            return self.scale_codec(l, k).log_range if self.token_scale else None

        return {
            (l, k): SpectralQuantizer(
                self.tensor(l, k, "mean"),
                self.tensor(l, k, "basis"),
                self.tensor(l, k, "eigenvalues"),
                self.tensor(l, k, "codebooks"),
                alloc[(l, k)],
                self.token_scale,
                self.outlier_threshold,
                self.outlier_cap,
                **position_terms(l, k),
                scale_range=scale_range(l, k),
                head_group=self.head_group,
            )
            for (l, k) in alloc
        }

    def with_bits(self, bits: float) -> SpectralKVConfig:
        """A copy serving another budget (tensors shared, allocation recomputed)."""
        new = copy.copy(self)
        new.bits = check_budget(bits)
        if new.bits < self.min_bits:
            raise ValueError(self._budget_too_small(new.bits))
        new._alloc_cache = self._alloc_cache
        return new

    def with_weight_profiles(self, profiles: list[dict[str, Any]]) -> SpectralKVConfig:
        """A copy whose other budgets are allocated with ``profiles`` (validated; allocations recomputed)."""
        new = copy.copy(self)
        new.weight_profiles = check_weight_profiles(profiles, len(self.compressed_layers), self.default_bits)
        new._alloc_cache = {}
        return new

    def without_outliers(self) -> SpectralKVConfig:
        """A copy that keeps no exact outliers (what the fused Triton kernel reads); the allocation is recomputed
        with the bits the outliers used."""
        if self.outlier_threshold is None:
            return self
        new = copy.copy(self)
        new.outlier_threshold, new.outlier_fraction = None, 0.0
        new._alloc_cache, new._stored_allocation = {}, False
        return new

    def bytes_per_token(self, bits: float | None = None) -> float:
        """Bytes per token for all compressed layers' codes and scales."""
        return self.effective_bits(bits) * self.coords_per_token / 8

    # -- compatibility ----------------------------------------------------------------------------------------
    def check_compatible(self, model: Any) -> None:
        """Raise :class:`IncompatibleCalibrationError` naming each field where ``model`` differs."""
        check_supported(model)
        diff = mismatches(self.fingerprint, fingerprint(model))
        if diff:
            raise IncompatibleCalibrationError(
                f"This calibration was made for {self.base_model!r} and does not match the model: "
                + "; ".join(diff)
                + ". Use a calibration made for this model, or run `spectralkv calibrate --model ...`."
            )

    # -- serialisation ----------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "spectralkv_version": self.spectralkv_version,
            "base_model": self.base_model,
            "base_model_revision": self.base_model_revision,
            "fingerprint": self.fingerprint,
            "compressed_layers": list(self.compressed_layers),
            "default_bits": self.default_bits,
            "token_scale": self.token_scale,
            "scale_format": self.scale_format,
            "key_weight": self.key_weight,
            "outlier_threshold": self.outlier_threshold,
            "outlier_fraction": self.outlier_fraction,
            "position_centring": self.position_centring,
            "sink_tokens": self.sink_tokens,
            "window": self.window,
            "group_size": self.group_size,
            "head_group": self.head_group,
            "weight_profiles": self.weight_profiles,
            "calibration": self.calibration,
            "measured": self.measured,
        }

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, card: bool = True, repo_id: str | None = None
    ) -> Path:
        """Write the calibration folder (config JSON, safetensors, model card). Returns the folder. ``repo_id``
        names the Hub repo in the card's usage snippet (a placeholder otherwise)."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".spectralkv-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise OSError(f"Cannot write the calibration to {str(out)!r}: {e}. Choose a writable --out folder.") from e
        tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(self.tensors.items())}
        tmp = out / (TENSORS_NAME + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "spectralkv_format_version": str(FORMAT_VERSION)})
        tmp.replace(out / TENSORS_NAME)
        data = self.to_json_dict()
        data["tensors_file"] = TENSORS_NAME
        data["tensors_sha256"] = file_sha256(out / TENSORS_NAME)
        (out / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if card:
            from .card import render_card

            (out / CARD_NAME).write_text(render_card(self, repo_id=repo_id), encoding="utf-8")
        return out

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        bits: float | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        model: Any = None,
    ) -> SpectralKVConfig:
        """Load from a local folder or a Hub repo (through huggingface_hub: offline cache, ``revision``,
        ``subfolder``). With ``model``, also check the calibration matches it before returning."""
        cfg_path, tensors_path = _resolve_files(
            str(path_or_repo_id), revision, subfolder, cache_dir, local_files_only, token
        )
        from .validate import load_validated

        config = load_validated(cls, cfg_path, tensors_path, bits=bits)
        if model is not None:
            config.check_compatible(model)
        return config

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str = "Upload spectralkv calibration",
        path_in_repo: str | None = None,
    ) -> Any:
        """Create the repo if needed and upload the calibration folder with ``HfApi``. Returns the commit info."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, repo_id=repo_id)
            return api.upload_folder(
                folder_path=tmp,
                repo_id=repo_id,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message,
                path_in_repo=path_in_repo,
            )


def check_head_group(head_group: Any, num_kv_heads: int) -> int:
    """A valid number of KV heads per basis: a positive divisor of the model's KV heads."""
    if isinstance(head_group, bool) or not isinstance(head_group, int) or head_group < 1 or num_kv_heads % head_group:
        divisors = [g for g in range(1, num_kv_heads + 1) if num_kv_heads % g == 0]
        raise ValueError(f"`head_group` (KV heads per basis) must divide the model's {num_kv_heads} KV heads: one of "
                         f"{divisors}, got {head_group!r}.")
    return head_group


def check_weight_profiles(profiles: Any, n_layers: int, default_bits: float) -> list[dict[str, Any]]:
    """Validated weight profiles (see :class:`SpectralKVConfig`) sorted by budget; ``ValueError`` names the fault."""
    if not isinstance(profiles, list):
        raise ValueError(f"`weight_profiles` must be a list, got {type(profiles).__name__}.")
    out, seen = [], set()
    for i, p in enumerate(profiles):
        if not isinstance(p, dict) or set(p) != {"bits", "factors"}:
            raise ValueError(f"weight_profiles[{i}] must be an object with exactly 'bits' and 'factors'.")
        b = p["bits"]
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"weight_profiles[{i}].bits must be a number, got {b!r}.")
        b = check_budget(float(b))
        if b in seen:
            raise ValueError(f"weight_profiles has two profiles for {b:g} bits.")
        if b == default_bits:
            raise ValueError(f"weight_profiles has a profile for default_bits ({b:g}), whose weights are the stored "
                             "ones.")
        seen.add(b)
        f = p["factors"]
        ok = isinstance(f, list) and len(f) == n_layers and all(
            isinstance(r, list) and len(r) == len(KINDS) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in r)
            for r in f)
        if not ok:
            raise ValueError(f"weight_profiles[{i}].factors must be {n_layers} pairs [key, value] of finite positive "
                             "numbers, one per compressed layer.")
        out.append({"bits": b, "factors": [[float(x) for x in r] for r in f]})
    return sorted(out, key=lambda p: p["bits"])


def _resolve_files(
    path_or_repo_id: str,
    revision: str | None,
    subfolder: str | None,
    cache_dir: Any,
    local_files_only: bool,
    token: Any,
) -> tuple[Path, Path]:
    local = Path(path_or_repo_id)
    if subfolder:
        local = local / subfolder
    if local.is_dir():
        cfg, ten = local / CONFIG_NAME, local / TENSORS_NAME
        for p in (cfg, ten):
            if not p.is_file():
                raise CalibrationFormatError(
                    f"{str(local)!r} is not a spectralkv calibration: {p.name} is missing. "
                    "Create one with `spectralkv calibrate --out DIR`."
                )
        return cfg, ten
    if os.path.sep in path_or_repo_id and path_or_repo_id.count("/") != 1 or local.exists():
        raise CalibrationFormatError(f"{path_or_repo_id!r} is neither a calibration folder nor a Hub repo id.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    kwargs = dict(
        repo_id=path_or_repo_id, revision=revision, subfolder=subfolder, cache_dir=cache_dir,
        local_files_only=local_files_only, token=token,
    )
    try:
        cfg = Path(hf_hub_download(filename=CONFIG_NAME, **kwargs))
        ten = Path(hf_hub_download(filename=TENSORS_NAME, **kwargs))
    except LocalEntryNotFoundError as e:
        raise CalibrationFormatError(
            f"Calibration {path_or_repo_id!r} (revision {revision or 'main'}) is not in the local Hub cache and the "
            f"Hub cannot be reached ({e.__class__.__name__}). Download it first with "
            f"`hf download {path_or_repo_id} --include '*.json' '*.safetensors'` or unset HF_HUB_OFFLINE."
        ) from e
    except EntryNotFoundError as e:
        raise CalibrationFormatError(
            f"Hub repo {path_or_repo_id!r} has no {CONFIG_NAME}/{TENSORS_NAME}: it is not a spectralkv calibration."
        ) from e
    except HfHubHTTPError as e:
        raise CalibrationFormatError(f"Could not fetch calibration {path_or_repo_id!r} from the Hub: {e}") from e
    return cfg, ten


__all__ = ["SpectralKVConfig", "CalibrationFormatError", "CONFIG_NAME", "TENSORS_NAME", "KINDS", "MAX_BITS"]
