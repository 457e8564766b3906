"""Find community calibrations on the Hugging Face Hub (``spectralkv list --base-model ORG/NAME``).

Published calibrations carry ``library_name: spectralkv`` and ``base_model: ORG/NAME`` in their card (see
:mod:`spectralkv.card`); the Hub turns those into the tags ``spectralkv`` and ``base_model:ORG/NAME``, which is what
:func:`find_calibrations` filters on through ``HfApi().list_models``. Results are re-checked on our side too.

Listing needs the network. Offline (``HF_HUB_OFFLINE=1``) or when the Hub cannot be reached, :class:`DiscoveryError`
explains that, and names the calibrations already in the local Hub cache (:func:`cached_calibrations`), which load
offline. A listing is not an endorsement: check any calibration with ``spectralkv validate REPO --model ID``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

LIBRARY = "spectralkv"
_BITS_TAG = re.compile(r"^(\d+(?:\.\d+)?)-bit$")


class DiscoveryError(ConnectionError):
    """The Hub could not be asked; the message says why and what works offline."""


@dataclass(frozen=True)
class CalibrationListing:
    """One calibration repo as the Hub lists it."""

    repo_id: str
    base_models: tuple[str, ...] = ()
    budgets: tuple[float, ...] = ()  # from the card's "<bits>-bit" tags: the default budget(s) it was made for
    downloads: int | None = None
    likes: int | None = None
    last_modified: datetime | None = None
    dppl_pct: dict[float, float] = field(default_factory=dict)  # budget -> measured dPPL %, from the model-index

    def summary(self) -> str:
        bits = ",".join(f"{b:g}" for b in self.budgets) or "?"
        dppl = " ".join(f"{b:g}b:{v:+.2f}%" for b, v in sorted(self.dppl_pct.items())) or "-"
        when = self.last_modified.date().isoformat() if self.last_modified else "-"
        return (f"{self.repo_id:<40} bits {bits:<6} dPPL {dppl:<28} downloads {self.downloads or 0:<6} "
                f"likes {self.likes or 0:<4} updated {when}")


def _base_models(info: Any) -> tuple[str, ...]:
    tags = info.tags or []
    found = [t.split(":")[-1] for t in tags if t.startswith("base_model:") and t.count(":") <= 2]
    card_base = getattr(getattr(info, "card_data", None), "base_model", None)
    if isinstance(card_base, str):
        found.append(card_base)
    elif isinstance(card_base, list):
        found += [b for b in card_base if isinstance(b, str)]
    return tuple(dict.fromkeys(found))


def _dppl(info: Any) -> dict[float, float]:
    out = {}
    for r in getattr(getattr(info, "card_data", None), "eval_results", None) or []:
        m = re.search(r"@ (\d+(?:\.\d+)?) bits", r.metric_name or "")
        if r.metric_type == "delta_perplexity" and m and isinstance(r.metric_value, (int, float)):
            out[float(m.group(1))] = float(r.metric_value)
    return out


def _listing(info: Any) -> CalibrationListing:
    budgets = sorted({float(m.group(1)) for t in info.tags or [] if (m := _BITS_TAG.match(t))})
    return CalibrationListing(info.id, _base_models(info), tuple(budgets), info.downloads, info.likes,
                              info.last_modified, _dppl(info))


def cached_calibrations(base_model: str | None = None, cache_dir: str | Path | None = None) -> list[str]:
    """Repo ids (``repo`` or ``repo/subfolder``) of calibrations in the local Hub cache, optionally only those made
    for ``base_model`` (read from each cached ``spectralkv_config.json``; nothing else is opened)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from .config import CONFIG_NAME

    try:
        cache = scan_cache_dir(cache_dir)
    except (CacheNotFound, OSError):
        return []
    found = set()
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            for f in rev.files:
                if f.file_name != CONFIG_NAME:
                    continue
                try:
                    data = json.loads(Path(f.file_path).read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                    continue
                if base_model is not None and (not isinstance(data, dict) or data.get("base_model") != base_model):
                    continue
                sub = Path(f.file_path).relative_to(rev.snapshot_path).parent.as_posix()
                found.add(repo.repo_id if sub == "." else f"{repo.repo_id}/{sub}")
    return sorted(found)


def _offline_error(reason: str, base_model: str | None, cache_dir: str | Path | None) -> DiscoveryError:
    cached = cached_calibrations(base_model, cache_dir)
    hint = (f" Calibrations already in your local Hub cache (these load offline): {', '.join(cached)}." if cached
            else " No calibration for it is in your local Hub cache.")
    return DiscoveryError(
        f"Listing calibrations on the Hugging Face Hub needs network access, and {reason}. Connect and unset "
        f"HF_HUB_OFFLINE, or use a calibration folder you already have.{hint}"
    )


def find_calibrations(
    base_model: str | None = None,
    *,
    limit: int | None = 50,
    sort: str = "downloads",
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
) -> list[CalibrationListing]:
    """spectralkv calibrations on the Hub, most downloaded first; with ``base_model`` only those made for it.

    Raises :class:`DiscoveryError` offline or when the Hub cannot be reached (naming cached calibrations, looked up
    in ``cache_dir``, that work offline)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE:
        raise _offline_error("HF_HUB_OFFLINE is set", base_model, cache_dir)
    filters = [LIBRARY] + ([f"base_model:{base_model}"] if base_model else [])
    import httpx2

    try:
        infos = list(HfApi(token=token).list_models(filter=filters, sort=sort, limit=limit, cardData=True))
    except OfflineModeIsEnabled:
        raise _offline_error("HF_HUB_OFFLINE is set", base_model, cache_dir) from None
    except (httpx2.TransportError, ConnectionError, TimeoutError) as e:
        raise _offline_error(f"the Hub could not be reached ({type(e).__name__}: {e})", base_model,
                             cache_dir) from None
    except HfHubHTTPError as e:
        raise DiscoveryError(f"The Hub refused the listing: {e}") from None
    out = []
    for info in infos:
        if LIBRARY not in (info.tags or []) and getattr(info, "library_name", None) != LIBRARY:
            continue
        listing = _listing(info)
        if base_model and base_model not in listing.base_models:
            continue
        out.append(listing)
    return out


__all__ = ["CalibrationListing", "DiscoveryError", "cached_calibrations", "find_calibrations"]
