"""Weight profiles: per-layer K/V weights re-fitted at other budgets, so ``bits=`` serves each budget with weights
measured near it. The calibration keeps a profile only where it lowers the held-out error; the config allocates a
budget with the nearest calibrated budget's weights; bad profiles in an artifact are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_calibrate

from spectralkv.config import CONFIG_NAME, CalibrationFormatError, SpectralKVConfig
from spectralkv.validate import validate_calibration


@pytest.fixture(scope="module")
def profiled(tiny_llama: torch.nn.Module) -> SpectralKVConfig:
    return tiny_calibrate(tiny_llama, profile_budgets=(1.5, 2.0, 2.5, 3.0, 4.0))


def _ones(cfg: SpectralKVConfig, bits: float, value: float = 1.0) -> dict[str, Any]:
    return {"bits": bits, "factors": [[value, value] for _ in cfg.compressed_layers]}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_calibration_measures_every_budget_and_keeps_only_what_helps(profiled: SpectralKVConfig) -> None:
    rows = profiled.measured["budget_profiles"]
    assert [r["bits"] for r in rows] == [1.5, 2.0, 2.5, 4.0]  # the default budget (3) is the main search
    kept = {p["bits"] for p in profiled.weight_profiles}
    for r in rows:
        assert r["kept"] == (r["heldout_error_profile"] < r["heldout_error_default_weights"])
        assert (r["bits"] in kept) == r["kept"]
    assert kept, "on the tiny model at least one budget's re-fitted weights beat the default's"


def test_a_kept_profile_is_what_the_config_serves(profiled: SpectralKVConfig) -> None:
    """The allocation at a profiled budget is the one the calibration measured there (its K/V split), and differs
    from what the default weights give; the default budget keeps its stored allocation."""
    plain = profiled.with_weight_profiles([])
    rows = {r["bits"]: r for r in profiled.measured["budget_profiles"]}
    for p in profiled.weight_profiles:
        b = p["bits"]
        split = profiled.kv_split(b)
        assert split == pytest.approx({"key_bits": rows[b]["key_bits"], "value_bits": rows[b]["value_bits"]})
        assert profiled.effective_bits(b) <= b + 1e-9
    assert any(not _same(profiled.allocation(p["bits"]), plain.allocation(p["bits"]))
               for p in profiled.weight_profiles)
    assert _same(profiled.allocation(profiled.default_bits), plain.allocation(profiled.default_bits))


def test_nearest_calibrated_budget_serves(tiny_llama_calibration: SpectralKVConfig) -> None:
    cfg = tiny_llama_calibration.with_weight_profiles([_ones(tiny_llama_calibration, 2.0),
                                                       _ones(tiny_llama_calibration, 4.0)])
    assert cfg.default_bits == 3.0
    assert [cfg.profile_bits(b) for b in (1.0, 2.4, 2.5, 2.6, 3.0, 3.5, 3.6, 8.0)] == [2, 2, 2, 3, 3, 3, 4, 4]


def test_profile_factors_scale_the_weights(tiny_llama_calibration: SpectralKVConfig) -> None:
    """All-ones factors change nothing; a uniform factor changes nothing either (greedy allocation is scale-free);
    a factor on one side moves bits to it, only at the budgets that profile serves."""
    base = tiny_llama_calibration.with_weight_profiles([])
    assert _same(tiny_llama_calibration.with_weight_profiles([_ones(base, 2.0)]).allocation(2.0), base.allocation(2.0))
    assert _same(tiny_llama_calibration.with_weight_profiles([_ones(base, 2.0, 7.0)]).allocation(2.0),
                 base.allocation(2.0))
    keys_up = {"bits": 2.0, "factors": [[50.0, 1.0] for _ in base.compressed_layers]}
    cfg = tiny_llama_calibration.with_weight_profiles([keys_up])
    assert cfg.kv_split(2.0)["key_bits"] > base.kv_split(2.0)["key_bits"]
    assert _same(cfg.allocation(4.0), base.allocation(4.0))


@pytest.mark.parametrize(
    ("profiles", "match"),
    [([{"bits": 2.0}], "exactly 'bits' and 'factors'"),
     ([{"bits": "2", "factors": []}], "bits must be a number"),
     ([{"bits": 9.0, "factors": []}], "budget"),
     ([{"bits": 2.0, "factors": [[1.0, 1.0]]}], "pairs"),
     ([{"bits": 2.0, "factors": "x"}], "pairs"),
     ("not a list", "must be a list")],
)
def test_bad_profiles_are_refused(tiny_llama_calibration: SpectralKVConfig, profiles: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_llama_calibration.with_weight_profiles(profiles)


def test_duplicate_and_default_budget_profiles_are_refused(tiny_llama_calibration: SpectralKVConfig) -> None:
    cfg = tiny_llama_calibration
    with pytest.raises(ValueError, match="two profiles for 2 bits"):
        cfg.with_weight_profiles([_ones(cfg, 2.0), _ones(cfg, 2.0)])
    with pytest.raises(ValueError, match="default_bits"):
        cfg.with_weight_profiles([_ones(cfg, 3.0)])


def test_profiles_round_trip(profiled: SpectralKVConfig, tmp_path: Path) -> None:
    back = SpectralKVConfig.from_pretrained(profiled.save_pretrained(tmp_path / "c"))
    assert back.weight_profiles == profiled.weight_profiles
    for p in profiled.weight_profiles:
        assert _same(back.allocation(p["bits"]), profiled.allocation(p["bits"]))
    report = validate_calibration(tmp_path / "c")
    kept = ", ".join(f"{p['bits']:g}" for p in profiled.weight_profiles)
    assert report.ok and report["config schema"].message.endswith(f"weights re-fitted at: {kept}")
    card = (tmp_path / "c" / "README.md").read_text()
    assert "Other budgets" in card
    for r in profiled.measured["budget_profiles"]:
        assert f"| {r['bits']:g} |" in card


@pytest.mark.parametrize(
    ("edit", "match"),
    [(lambda fs: fs[0].__setitem__(0, -1.0), "finite positive"),
     (lambda fs: fs[0].__setitem__(1, float("nan")), "finite positive"),
     (lambda fs: fs.pop(), "one per compressed layer")],
)
def test_corrupt_profiles_in_an_artifact_are_refused(profiled: SpectralKVConfig, tmp_path: Path, edit: Any,
                                                     match: str) -> None:
    folder = profiled.with_weight_profiles([_ones(profiled, 2.0)]).save_pretrained(tmp_path / "c")
    data = json.loads((folder / CONFIG_NAME).read_text())
    edit(data["weight_profiles"][0]["factors"])
    (folder / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(CalibrationFormatError, match=match):
        SpectralKVConfig.from_pretrained(folder)
    report = validate_calibration(folder)
    assert not report.ok and match in report.format()


def test_profile_at_the_default_budget_in_an_artifact_is_refused(profiled: SpectralKVConfig, tmp_path: Path) -> None:
    folder = profiled.with_weight_profiles([]).save_pretrained(tmp_path / "c")
    data = json.loads((folder / CONFIG_NAME).read_text())
    data["weight_profiles"] = [_ones(profiled, profiled.default_bits)]
    (folder / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(CalibrationFormatError, match="profile for default_bits"):
        SpectralKVConfig.from_pretrained(folder)


def test_no_profile_budgets_means_one_set_of_weights(tiny_llama: torch.nn.Module) -> None:
    cfg = tiny_calibrate(tiny_llama, profile_budgets=())
    assert cfg.weight_profiles == [] and cfg.measured["budget_profiles"] == []
    with pytest.raises(ValueError, match=r"`profile_budgets` \(2.0, 9.0\): The bit budget must be in \(0, 8\]"):
        tiny_calibrate(tiny_llama, profile_budgets=(2.0, 9.0))


def test_cli_flag_and_summary(profiled: SpectralKVConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--profile-budgets`` reaches calibrate (alone: none; absent: the library default); inspect names the
    weights each budget is served with."""
    from spectralkv import calibrate as calibrate_module
    from spectralkv.cli import _calibrate_from_args, build_parser
    from spectralkv.inspection import summary_text

    seen: list[tuple[float, ...]] = []
    monkeypatch.setattr(calibrate_module, "calibrate", lambda *a, **kw: seen.append(kw["profile_budgets"]))
    parser = build_parser()
    for argv in (["calibrate"], ["calibrate", "--profile-budgets"], ["calibrate", "--profile-budgets", "2", "4"]):
        _calibrate_from_args(None, None, parser.parse_args(argv))
    assert seen == [calibrate_module.PROFILE_BUDGETS, (), (2.0, 4.0)]
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "--profile-budgets", "9"])
    kept = profiled.weight_profiles[0]["bits"]
    assert f"{kept:g} bits uses those of {kept:g}" in summary_text(profiled, bits=kept)
    assert "3 bits uses those of 3" in summary_text(profiled)
