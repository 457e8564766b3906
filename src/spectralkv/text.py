"""Text for calibration and evaluation, split so the two never overlap.

The default source is the standard library's ``pydoc_data.topics`` (about 113k SmolLM2 tokens, always available
offline). The token stream is split once: the first ``CALIBRATION_FRACTION`` is calibration text (itself split into
fitting and held-out parts by the calibrator), everything from ``EVALUATION_START`` on is evaluation text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CALIBRATION_FRACTION = 0.45
EVALUATION_START = 0.5


def load_text(source: str = "pydoc") -> str:
    """Return the raw text of ``source``: ``"pydoc"`` or a path to a UTF-8 text file."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"Text source {source!r} is neither 'pydoc' nor an existing text file.")
    return path.read_text(encoding="utf-8")


def token_stream(tokenizer: Any, source: str = "pydoc") -> torch.Tensor:
    """Tokenize the whole source once (no special tokens) into a 1-D LongTensor."""
    ids = tokenizer(load_text(source), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_tokens(tokenizer: Any, source: str = "pydoc") -> torch.Tensor:
    ids = token_stream(tokenizer, source)
    return ids[: int(len(ids) * CALIBRATION_FRACTION)]


def evaluation_tokens(tokenizer: Any, source: str = "pydoc") -> torch.Tensor:
    ids = token_stream(tokenizer, source)
    return ids[int(len(ids) * EVALUATION_START) :]


def windows(ids: torch.Tensor, seq_len: int, count: int | None = None) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of ``seq_len`` tokens (the tail that does not fill one is dropped)."""
    n = len(ids) // seq_len
    if count is not None:
        n = min(n, count)
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
