"""Calibration format versions, and the upgrade path from older ones (a small migration registry).

``format_version`` in ``spectralkv_config.json`` names the layout of the config and the tensors. This spectralkv reads
its own version (:data:`FORMAT_VERSION`) and every older *supported* one: an older config is upgraded in memory on
load, one registered migration at a time (the files are not rewritten; ``save_pretrained`` writes the current
version). A newer version is refused with a message naming both versions.

Versions:

- **0**: the pre-release layout (spectralkv before 0.1.0). Its configs carry no ``format_version`` field at all
  (versioning came with format 1), no ``spectralkv_version``, and neither ``window`` nor ``group_size``: the
  full-precision recent window was only a run-time argument (default 32) and allocation groups were fixed at 8
  coordinates. The tensors file is the same as in format 1. The upgrade fills the missing fields with those values.
- **1**: spectralkv 0.1. Records ``format_version``, ``spectralkv_version``, ``window`` and ``group_size``.
- **2**: adds ``outlier_threshold`` (exact outlier coordinates, null: off) and ``outlier_fraction`` (their measured
  share, which the allocation reserves bits for). The upgrade from 1 sets them to null and 0: no outliers, exactly
  what format 1 meant.
- **3**: adds ``weight_profiles``: per-layer K/V weights re-fitted at other budgets (a list, possibly empty), so a
  budget other than the default is allocated with the weights measured nearest it. The upgrade from 2 sets it to
  ``[]``: every budget uses the stored weights, exactly what format 2 meant.
- **4**: adds ``position_centring`` (``"rope"``: keys centred on their rotated pre-RoPE mean, with the tensors
  ``layers.{i}.k.position_mean`` and ``rope.frequencies``; null: off). The upgrade from 3 sets it to null: keys
  centred on their mean alone, exactly what format 3 meant.
- **5**: adds ``scale_format`` (``"fp16"``, or ``"log8"``: one byte per token scale on a log scale, with the tensors
  ``layers.{i}.{k|v}.scale_range``). The upgrade from 4 sets it to ``"fp16"``: scales stored in fp16, exactly what
  format 4 meant.
- **6**: adds ``head_group`` (KV heads coded in one basis; the per-layer tensors then hold ``num_key_value_heads /
  head_group`` bases of dimension ``head_group * head_dim``). The upgrade from 5 sets it to 1: a basis per head,
  exactly what format 5 meant.

Because format 0 never wrote its number, a config with *no* ``format_version`` is format 0, while a *written*
``format_version`` below :data:`FIRST_WRITTEN_VERSION` is unknown and refused.

Adding a format: bump :data:`FORMAT_VERSION`, register ``@migration(FORMAT_VERSION - 1)`` on a function that turns a
config dict of the previous version into the new layout (changing nothing else), and add a test that loads an
artifact written in the previous layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

FORMAT_VERSION = 6
UNVERSIONED = 0  # the pre-release layout: no `format_version` field
FIRST_WRITTEN_VERSION = 1
PRE_RELEASE_WINDOW = 32
PRE_RELEASE_GROUP_SIZE = 8

Migration = Callable[[dict[str, Any]], dict[str, Any]]
MIGRATIONS: dict[int, Migration] = {}


def migration(from_version: int) -> Callable[[Migration], Migration]:
    """Register ``fn`` as the upgrade from ``from_version`` to ``from_version + 1``."""

    def register(fn: Migration) -> Migration:
        if from_version in MIGRATIONS:
            raise ValueError(f"A migration from format {from_version} is already registered.")
        MIGRATIONS[from_version] = fn
        return fn

    return register


@migration(UNVERSIONED)
def _pre_release_to_1(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    out.setdefault("window", PRE_RELEASE_WINDOW)
    out.setdefault("group_size", PRE_RELEASE_GROUP_SIZE)
    out.setdefault("spectralkv_version", "pre-release")
    return out


@migration(1)
def _no_outliers_to_2(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    out.setdefault("outlier_threshold", None)
    out.setdefault("outlier_fraction", 0.0)
    return out


@migration(2)
def _one_weight_set_to_3(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    out.setdefault("weight_profiles", [])
    return out


@migration(3)
def _unpositioned_to_4(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    out.setdefault("position_centring", None)
    return out


@migration(4)
def _fp16_scales_to_5(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    out.setdefault("scale_format", "fp16")
    return out


@migration(5)
def _per_head_bases_to_6(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    out.setdefault("head_group", 1)
    return out


def _fail(msg: str) -> NoReturn:
    from .config import CalibrationFormatError

    raise CalibrationFormatError(msg)


def version_of(data: dict[str, Any], filename: str) -> int:
    """The format version of a parsed config; raises ``CalibrationFormatError`` for a newer or unknown one."""
    if "format_version" not in data:
        return UNVERSIONED
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        _fail(f"{filename}: field 'format_version' has the wrong type ({type(version).__name__}).")
    if version > FORMAT_VERSION:
        _fail(
            f"This calibration uses format version {version}, but this spectralkv reads format version "
            f"{FORMAT_VERSION} and older: upgrade spectralkv (`pip install -U spectralkv`)."
        )
    if version < FIRST_WRITTEN_VERSION:
        _fail(f"{filename}: unknown format version {version}.")
    return version


def upgrade(data: dict[str, Any], filename: str) -> tuple[dict[str, Any], int]:
    """Return ``(data in the current format, the version it was written in)``; ``data`` itself is not modified."""
    original = version = version_of(data, filename)
    data = dict(data)
    while version < FORMAT_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:  # a gap in the registry is a bug here, not in the artifact
            raise RuntimeError(f"No migration from calibration format {version} to {version + 1} is registered.")
        data = step(data)
        version += 1
        data["format_version"] = version
    return data, original


def describe(original: int) -> str:
    """One line for a validation report: the version read, and the upgrade if there was one."""
    if original == FORMAT_VERSION:
        return f"format {FORMAT_VERSION} (current)"
    name = "format 0 (pre-release layout, no version recorded)" if original == UNVERSIONED else f"format {original}"
    return (f"{name}, upgraded to format {FORMAT_VERSION} in memory; save_pretrained() writes format "
            f"{FORMAT_VERSION}")


__all__ = ["FORMAT_VERSION", "MIGRATIONS", "UNVERSIONED", "describe", "migration", "upgrade", "version_of"]
