"""Format versions: the migration registry, the format-0 (pre-release) layout upgraded on load, newer and unknown
versions refused; and the packed-row byte format (pack/unpack) for arbitrary bit mixes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import test_validate
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_validate import _edit_json

from spectralkv import formats
from spectralkv.config import CONFIG_NAME, CalibrationFormatError, SpectralKVConfig
from spectralkv.packing import pack, unpack
from spectralkv.validate import validate_calibration

folder = test_validate.folder  # a fresh copy of ``pristine`` per test


@pytest.fixture(scope="module")
def plain_calibration(tiny_llama: torch.nn.Module) -> SpectralKVConfig:
    """Keys centred on their mean and fp16 scales: the only layout formats 0-3 had."""
    from conftest import tiny_calibrate

    return tiny_calibrate(tiny_llama, position_centring=None, scale_format="fp16")


@pytest.fixture(scope="module")
def pristine(plain_calibration: SpectralKVConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return plain_calibration.save_pretrained(tmp_path_factory.mktemp("pristine-plain"))


def _to_format_0(folder: Path) -> None:
    """Rewrite a current config in the documented pre-release layout (see ``spectralkv.formats``)."""
    def edit(d: dict[str, Any]) -> None:
        for key in ("format_version", "spectralkv_version", "window", "group_size", "outlier_threshold",
                    "outlier_fraction", "weight_profiles", "position_centring", "scale_format", "head_group"):
            d.pop(key)

    _edit_json(folder, edit)


def _to_format_1(folder: Path) -> None:
    """Rewrite a current config in format 1 (no outlier fields)."""
    def edit(d: dict[str, Any]) -> None:
        d.pop("outlier_threshold")
        d.pop("outlier_fraction")
        d.pop("weight_profiles")
        d.pop("position_centring")
        d.pop("scale_format")
        d.pop("head_group")
        d["format_version"] = 1

    _edit_json(folder, edit)


def _to_format_2(folder: Path) -> None:
    """Rewrite a current config in format 2 (one set of weights for every budget)."""
    def edit(d: dict[str, Any]) -> None:
        d.pop("weight_profiles")
        d.pop("position_centring")
        d.pop("scale_format")
        d.pop("head_group")
        d["format_version"] = 2

    _edit_json(folder, edit)


def _to_format_3(folder: Path) -> None:
    """Rewrite a current (unpositioned) config in format 3 (keys centred on their mean alone)."""
    def edit(d: dict[str, Any]) -> None:
        d.pop("position_centring")
        d.pop("scale_format")
        d.pop("head_group")
        d["format_version"] = 3

    _edit_json(folder, edit)


def _to_format_4(folder: Path) -> None:
    """Rewrite a current (fp16-scale) config in format 4 (no scale format: scales were fp16)."""
    def edit(d: dict[str, Any]) -> None:
        d.pop("scale_format")
        d.pop("head_group")
        d["format_version"] = 4

    _edit_json(folder, edit)


def _to_format_5(folder: Path) -> None:
    """Rewrite a current (per-head) config in format 5 (no head_group: a basis per KV head)."""
    def edit(d: dict[str, Any]) -> None:
        d.pop("head_group")
        d["format_version"] = 5

    _edit_json(folder, edit)


def test_format_5_upgraded_to_per_head_bases(folder: Path, plain_calibration: SpectralKVConfig) -> None:
    """Format 5 had one basis per KV head: the upgrade says so, and the quantizers decode as before."""
    _to_format_5(folder)
    cfg = SpectralKVConfig.from_pretrained(folder)
    assert (cfg.format_version, cfg.head_group) == (formats.FORMAT_VERSION, 1)
    x = torch.randn(2, cfg.num_kv_heads, 9, cfg.head_dim)
    for key, q in cfg.quantizers().items():
        assert q.head_group == 1
        assert torch.equal(q.fake_quantize(x), plain_calibration.quantizers()[key].fake_quantize(x))
    report = validate_calibration(folder)
    assert report.ok, report.format()
    assert report["format version"].message.startswith(f"format 5, upgraded to format {formats.FORMAT_VERSION}")


def test_format_4_upgraded_to_fp16_scales(folder: Path, plain_calibration: SpectralKVConfig) -> None:
    """Format 4 stored every per-token scale in fp16: the upgrade says so, and the quantizers keep fp16 scales."""
    _to_format_4(folder)
    cfg = SpectralKVConfig.from_pretrained(folder)
    assert (cfg.format_version, cfg.scale_format) == (formats.FORMAT_VERSION, "fp16")
    assert all(q.scale_codec.format == "fp16" for q in cfg.quantizers().values())
    report = validate_calibration(folder)
    assert report.ok, report.format()
    assert report["format version"].message.startswith(f"format 4, upgraded to format {formats.FORMAT_VERSION}")


def test_current_format_requires_the_scale_format_field(folder: Path) -> None:
    _edit_json(folder, lambda d: d.pop("scale_format"))
    with pytest.raises(CalibrationFormatError, match="scale_format"):
        SpectralKVConfig.from_pretrained(folder)


def test_format_3_upgraded_to_no_position_centring(folder: Path, plain_calibration: SpectralKVConfig) -> None:
    """Format 3 centred keys on their mean: the upgrade says so, and the quantizers need no positions."""
    _to_format_3(folder)
    cfg = SpectralKVConfig.from_pretrained(folder)
    assert (cfg.format_version, cfg.position_centring) == (formats.FORMAT_VERSION, None)
    assert not any(q.position_centred for q in cfg.quantizers().values())
    report = validate_calibration(folder)
    assert report.ok, report.format()
    assert report["format version"].message.startswith(f"format 3, upgraded to format {formats.FORMAT_VERSION}")


def test_current_format_requires_the_position_centring_field(folder: Path) -> None:
    _edit_json(folder, lambda d: d.pop("position_centring"))
    with pytest.raises(CalibrationFormatError, match="position_centring"):
        SpectralKVConfig.from_pretrained(folder)


def test_format_2_upgraded_to_no_weight_profiles(folder: Path, plain_calibration: SpectralKVConfig) -> None:
    """Format 2 had one set of weights: the upgrade gives no profiles, so every budget allocates as it did."""
    _to_format_2(folder)
    cfg = SpectralKVConfig.from_pretrained(folder)
    assert (cfg.format_version, cfg.weight_profiles) == (formats.FORMAT_VERSION, [])
    plain = plain_calibration.with_weight_profiles([])
    for b in (2.0, 2.5, 4.0):
        assert all(torch.equal(t, plain.allocation(b)[key]) for key, t in cfg.allocation(b).items())
    report = validate_calibration(folder)
    assert report.ok, report.format()
    assert report["format version"].message.startswith(f"format 2, upgraded to format {formats.FORMAT_VERSION}")


def test_format_1_upgraded_to_no_outliers(folder: Path) -> None:
    """Format 1 had no exact outliers: the upgrade says so, and the stored allocation still serves its budget."""
    _to_format_1(folder)
    cfg = SpectralKVConfig.from_pretrained(folder)
    assert (cfg.format_version, cfg.outlier_threshold, cfg.outlier_fraction) == (formats.FORMAT_VERSION, None, 0.0)
    assert all(q.outlier_threshold is None for q in cfg.quantizers().values())
    report = validate_calibration(folder)
    assert report.ok, report.format()
    assert report["format version"].message.startswith(f"format 1, upgraded to format {formats.FORMAT_VERSION}")


def test_every_older_version_has_a_migration() -> None:
    assert sorted(formats.MIGRATIONS) == list(range(formats.UNVERSIONED, formats.FORMAT_VERSION))


def test_format_0_upgraded_on_load(folder: Path, plain_calibration: SpectralKVConfig, tmp_path: Path) -> None:
    _to_format_0(folder)
    cfg = SpectralKVConfig.from_pretrained(folder)
    assert (cfg.format_version, cfg.window, cfg.group_size) == (formats.FORMAT_VERSION, 32, 8)
    assert cfg.spectralkv_version == "pre-release"
    assert all(torch.equal(cfg.tensors[n], t) for n, t in plain_calibration.tensors.items())
    report = validate_calibration(folder)
    assert report.ok, report.format()
    assert report["format version"].message.startswith("format 0 (pre-release layout, no version recorded), "
                                                       f"upgraded to format {formats.FORMAT_VERSION}")
    # saving writes the current format; the upgrade is not needed again
    data = json.loads((cfg.save_pretrained(tmp_path / "resaved") / CONFIG_NAME).read_text())
    assert (data["format_version"], data["window"], data["group_size"]) == (formats.FORMAT_VERSION, 32, 8)
    report = validate_calibration(tmp_path / "resaved")
    assert report["format version"].message == f"format {formats.FORMAT_VERSION} (current)"


def test_format_0_keeps_fields_it_has(folder: Path) -> None:
    """An upgrade only fills what the old layout lacked."""
    _to_format_0(folder)
    _edit_json(folder, lambda d: d.update(window=64))
    assert SpectralKVConfig.from_pretrained(folder).window == 64


def test_format_0_is_still_validated(folder: Path) -> None:
    """Upgraded configs go through the same schema checks."""
    _to_format_0(folder)
    _edit_json(folder, lambda d: d.pop("tensors_sha256"))
    with pytest.raises(CalibrationFormatError, match="missing the required field 'tensors_sha256'"):
        SpectralKVConfig.from_pretrained(folder)


@pytest.mark.parametrize(
    ("data", "expected"),
    [({}, 0), ({"format_version": 1}, 1),
     ({"format_version": 2}, 2), ({"format_version": 3}, 3), ({"format_version": 4}, 4), ({"format_version": 5}, 5),
     ({"format_version": 6}, 6),
     ({"format_version": 7}, "format version 7, but this spectralkv reads format version 6 and older"),
     ({"format_version": 0}, "unknown format version 0"), ({"format_version": -3}, "unknown format version -3"),
     ({"format_version": "1"}, r"'format_version' has the wrong type \(str\)"),
     ({"format_version": True}, r"'format_version' has the wrong type \(bool\)")],
)
def test_version_of(data: dict[str, Any], expected: int | str) -> None:
    if isinstance(expected, int):
        assert formats.version_of(data, CONFIG_NAME) == expected
    else:
        with pytest.raises(CalibrationFormatError, match=expected):
            formats.version_of(data, CONFIG_NAME)


def test_upgrade_chains_registered_steps_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """With future formats 7 and 8, a format-0 config goes 0 -> 1 -> ... -> 8, each step seeing the previous
    version (the real steps 0 -> 1 -> 2 -> 3 -> 4 -> 5 -> 6 included)."""
    seen: list[int] = []

    def step(d: dict[str, Any]) -> dict[str, Any]:
        seen.append(d["format_version"])
        return {**d, f"added_in_{d['format_version'] + 1}": True}

    monkeypatch.setattr(formats, "FORMAT_VERSION", 8)
    monkeypatch.setattr(formats, "MIGRATIONS", dict(formats.MIGRATIONS))
    formats.migration(6)(step)
    formats.migration(7)(step)
    original = {"default_bits": 3.0}
    out, version = formats.upgrade(original, CONFIG_NAME)
    assert version == 0 and out["format_version"] == 8 and seen == [6, 7]
    assert out["added_in_7"] and out["added_in_8"] and out["window"] == 32 and out["outlier_threshold"] is None
    assert out["weight_profiles"] == [] and out["position_centring"] is None and out["scale_format"] == "fp16"
    assert out["head_group"] == 1
    assert original == {"default_bits": 3.0}, "the input is not modified"
    assert formats.upgrade({"format_version": 7}, CONFIG_NAME)[0]["format_version"] == 8
    with pytest.raises(ValueError, match="already registered"):
        formats.migration(6)(step)


def test_gap_in_the_registry_is_a_bug_not_an_artifact_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "FORMAT_VERSION", 7)
    with pytest.raises(RuntimeError, match="No migration from calibration format 6 to 7"):
        formats.upgrade({"format_version": 6}, CONFIG_NAME)


# -- the packed-row byte format -----------------------------------------------------------------------------------
@st.composite
def bit_mixes(draw: st.DrawFn) -> tuple[list[tuple[int, torch.Tensor]], tuple[int, ...]]:
    """Regimes of (width, codes) packed one after another in a row, widest first, as the quantizer lays them out;
    arbitrary leading shape. (``test_packing.py`` checks this layout through the quantizer with real data; this
    checks the packing functions alone over many more shapes and mixes.)"""
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    widths = sorted(draw(st.sets(st.integers(1, 8), min_size=1, max_size=8)), reverse=True)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    regimes = []
    for b in widths:
        n = 8 * draw(st.integers(1, 4))
        regimes.append((b, torch.randint(0, 2**b, (*lead, n), generator=g)))
    return regimes, lead


@settings(max_examples=60, deadline=None)
@given(bit_mixes())
def test_pack_unpack_round_trip_for_arbitrary_bit_mixes(case: tuple[list[tuple[int, torch.Tensor]], tuple[int, ...]]
                                                        ) -> None:
    regimes, lead = case
    row = torch.cat([pack(codes, b) for b, codes in regimes], -1)
    assert row.dtype == torch.uint8
    assert row.shape == (*lead, sum(codes.shape[-1] * b // 8 for b, codes in regimes))
    start = 0
    for b, codes in regimes:  # each regime starts on a byte boundary and decodes back exactly
        nbytes = codes.shape[-1] * b // 8
        assert torch.equal(unpack(row[..., start : start + nbytes], b, codes.shape[-1]), codes)
        start += nbytes
