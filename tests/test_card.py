"""The Hub model card: valid YAML metadata the Hub indexes (library, base model, tags) and tables that match the
calibration they describe."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from spectralkv.card import render_card
from spectralkv.config import SpectralKVConfig


def _per_layer_table(text: str) -> tuple[list[str], list[list[str]]]:
    """The per-layer table's header and rows."""
    section = text.split("### Per layer", 1)[1].split("\n\n", 2)[1]  # the table follows the heading's blank line
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    assert lines[1].startswith("|---"), "header, separator, then one row per layer"
    header, *rows = ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[:1] + lines[2:])
    return header, rows


def _per_layer_rows(text: str) -> list[list[str]]:
    return _per_layer_table(text)[1]


@pytest.fixture(scope="module")
def readme(tiny_gemma2_calibration: SpectralKVConfig, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tiny_gemma2_calibration.save_pretrained(tmp_path_factory.mktemp("card"))
    return (folder / "README.md").read_text(encoding="utf-8")


def test_yaml_front_matter(readme: str, tiny_gemma2_calibration: SpectralKVConfig) -> None:
    assert readme.startswith("---\n")
    data = ModelCard(readme).data.to_dict()
    assert data["library_name"] == "spectralkv"
    assert data["base_model"] == tiny_gemma2_calibration.base_model == "tiny-random-gemma2"
    assert {"kv-cache", "spectralkv", "quantization", "4-bit"} <= set(data["tags"])
    assert "license" not in data or data["license"] is None


def test_per_layer_table_one_row_per_compressed_layer(readme: str, tiny_gemma2_calibration: SpectralKVConfig
                                                      ) -> None:
    cfg = tiny_gemma2_calibration
    header, rows = _per_layer_table(readme)
    # a RoPE-aware calibration (the default where the model allows it) adds the per-position centre's energy
    assert cfg.position_centring == "rope"
    assert header == ["layer", "key PR", "value PR", "key energy in mean", "key energy in per-position centre",
                      "key bits", "value bits", "held-out output error"]
    col = {name: i for i, name in enumerate(header)}
    assert [int(r[0]) for r in rows] == cfg.compressed_layers == [1, 3]
    alloc = cfg.allocation(cfg.default_bits)
    for row, measured in zip(rows, cfg.measured["layers"], strict=True):
        layer = measured["layer"]
        assert len(row) == len(header)
        assert row[col["key PR"]] == f"{measured['k_participation_ratio']:.1f}"
        assert row[col["value PR"]] == f"{measured['v_participation_ratio']:.1f}"
        assert row[col["key energy in per-position centre"]] == f"{100 * measured['k_centre_energy']:.0f}%"
        assert row[col["key bits"]] == f"{float(alloc[(layer, 'k')].double().mean()):.2f}"
        assert row[col["value bits"]] == f"{float(alloc[(layer, 'v')].double().mean()):.2f}"


def test_summary_figures_match_config(readme: str, tiny_gemma2_calibration: SpectralKVConfig) -> None:
    cfg = tiny_gemma2_calibration
    eff = cfg.effective_bits(cfg.default_bits)
    assert f"**{eff:.2f} bits per coordinate**" in readme
    assert f"({16 / eff:.1f}x smaller than fp16" in readme
    split = cfg.kv_split(cfg.default_bits)
    assert f"| {split['key_bits']:.2f} / {split['value_bits']:.2f} |" in readme
    assert f"| {cfg.bytes_per_token(cfg.default_bits):.0f} |" in readme
    assert f"| {2 * cfg.coords_per_token} |" in readme
    assert f"spectralkv {cfg.spectralkv_version}, format version {cfg.format_version}" in readme
    assert "ORG/NAME" in readme, "a local save has no repo id to show"
    assert not re.search(r"\bnan\b", readme, re.IGNORECASE), "every measured figure is filled in"


def test_repo_id_and_revision(tiny_gemma2_calibration: SpectralKVConfig) -> None:
    cfg = dataclasses.replace(tiny_gemma2_calibration, base_model="google/gemma-2-2b", base_model_revision="abc123")
    text = render_card(cfg, repo_id="me/gemma-skv")
    assert 'from_pretrained("me/gemma-skv", bits=4.0, model=model)' in text
    assert "at revision `abc123`" in text
    assert ModelCard(text).data.to_dict()["base_model"] == "google/gemma-2-2b"
    assert re.search(r"\[google/gemma-2-2b\]\(https://huggingface.co/google/gemma-2-2b\)", text)


def test_card_without_measurements_still_renders(tiny_gemma2_calibration: SpectralKVConfig, tmp_path: Path) -> None:
    """A calibration loaded from a folder without the optional ``measured`` block can still be saved."""
    bare = dataclasses.replace(tiny_gemma2_calibration, measured={}, calibration={})
    text = render_card(bare)
    assert _per_layer_rows(text) == []
    assert ModelCard(text).data.to_dict()["library_name"] == "spectralkv"
    bare.save_pretrained(tmp_path)
    assert SpectralKVConfig.from_pretrained(tmp_path).measured == {}


def test_plain_calibration_card_has_no_centre_column(tiny_gemma2_calibration: SpectralKVConfig) -> None:
    """Keys centred on their mean alone: no per-position centre to report, and the card says which centring."""
    plain = dataclasses.replace(tiny_gemma2_calibration, position_centring=None)
    text = render_card(plain)
    header, rows = _per_layer_table(text)
    assert "key energy in per-position centre" not in header and len(header) == 7
    assert all(len(r) == 7 for r in rows) and rows
    assert "| key centring | post-RoPE mean |" in text
    assert "RoPE-aware" in render_card(tiny_gemma2_calibration)
