"""Discovery: ``find_calibrations`` / ``spectralkv list`` ask ``HfApi().list_models`` for the ``spectralkv`` library
tag and the ``base_model:`` tag, re-check what comes back, read budgets and measured dPPL from the cards; offline or
unreachable, they say that the Hub needs network and name calibrations already cached. No network: ``list_models``
is patched at the class, or served by an in-process fake Hub through huggingface_hub's own HTTP client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils import _http
from test_hub import SHA_MAIN, _files, _populate

from spectralkv.card import render_card
from spectralkv.cli import main
from spectralkv.config import SpectralKVConfig
from spectralkv.discovery import DiscoveryError, cached_calibrations, find_calibrations

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _item(repo_id: str, tags: list[str], **extra: Any) -> dict[str, Any]:
    return {"id": repo_id, "tags": tags, "downloads": 10, "likes": 2, "lastModified": "2026-11-01T10:00:00.000Z",
            **extra}


@pytest.fixture(scope="module")
def card_data(tiny_llama_calibration: SpectralKVConfig) -> dict[str, Any]:
    """The YAML metadata ``spectralkv push`` writes, for a calibration of BASE with a quick evaluation."""
    import dataclasses

    cfg = dataclasses.replace(tiny_llama_calibration, base_model=BASE)
    evaluation = {"text": "pydoc", "windows": 4, "prefill": 96, "decode": 16, "scored_tokens": 64,
                  "reference_ppl": 20.0, "window": 32, "sink_tokens": 4, "spectralkv_version": "0.1.0",
                  "budgets": [{"bits": b, "bits_per_coordinate": b, "bytes_per_token": cfg.bytes_per_token(b),
                               "ppl": 20.0 * (1 + d / 100), "dppl_pct": d, "ci95_pct": [d - 1, d + 1]}
                              for b, d in [(2.0, 4.5), (3.0, 1.25)]]}
    return ModelCard(render_card(cfg, repo_id="org/smol-skv", evaluation=evaluation)).data.to_dict()


def _listing(card_data: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        _item("org/smol-skv", ["spectralkv", "kv-cache", "3-bit", f"base_model:{BASE}", f"base_model:adapter:{BASE}"],
              cardData=card_data),
        _item("org/smol-skv-2bit", ["spectralkv", "2-bit", f"base_model:adapter:{BASE}"], likes=None),
        _item("other/not-ours", ["transformers", f"base_model:{BASE}"]),  # the server ignored a filter
        _item("org/llama-skv", ["spectralkv", "3-bit", "base_model:meta-llama/Llama-3.2-1B"]),
    ]


@pytest.fixture
def patched_listing(monkeypatch: pytest.MonkeyPatch, card_data: dict[str, Any]) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def list_models(self: HfApi, **kwargs: Any) -> Iterator[ModelInfo]:
        calls.append(kwargs)
        yield from (ModelInfo(**item) for item in _listing(card_data))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "list_models", list_models)
    return calls


def test_find_calibrations_for_a_base_model(patched_listing: list[dict[str, Any]]) -> None:
    found = find_calibrations(BASE, limit=20)
    assert patched_listing == [{"filter": ["spectralkv", f"base_model:{BASE}"], "sort": "downloads", "limit": 20,
                                "cardData": True}]
    assert [c.repo_id for c in found] == ["org/smol-skv", "org/smol-skv-2bit"]
    smol, two = found
    assert smol.base_models == (BASE,) and smol.budgets == (3.0,) and smol.downloads == 10
    assert smol.dppl_pct == {2.0: 4.5, 3.0: 1.25}, "measured results come from the card's model-index"
    assert two.budgets == (2.0,) and two.dppl_pct == {} and two.likes is None
    assert smol.last_modified is not None and smol.last_modified.year == 2026


def test_find_all_calibrations(patched_listing: list[dict[str, Any]]) -> None:
    found = find_calibrations(limit=None)
    assert patched_listing[0]["filter"] == ["spectralkv"]
    assert [c.repo_id for c in found] == ["org/smol-skv", "org/smol-skv-2bit", "org/llama-skv"]


def test_cli_list(patched_listing: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--base-model", BASE]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("org/smol-skv ") and "2b:+4.50% 3b:+1.25%" in out[0] and "updated 2026-11-01" in out[0]
    assert out[1].startswith("org/smol-skv-2bit ")
    assert "2 calibration(s)" in out[-1] and "spectralkv validate" in out[-1]
    assert main(["list", "--base-model", BASE, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["repo_id"] == "org/smol-skv" and data[0]["dppl_pct"] == {"2": 4.5, "3": 1.25}
    assert main(["list", "--base-model", "nobody/nothing"]) == 0
    assert "No spectralkv calibrations found for nobody/nothing" in capsys.readouterr().out


def test_query_through_the_http_client(card_data: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The real list_models code path against a fake /api/models: the query the Hub receives."""
    seen: list[httpx2.URL] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.path != "/api/models":  # huggingface_hub may ask other endpoints of its own
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})
        seen.append(request.url)
        return httpx2.Response(200, json=_listing(card_data))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(
        transport=httpx2.MockTransport(handler), event_hooks={"request": [_http.hf_request_event_hook]}))
    try:
        found = find_calibrations(BASE)
    finally:
        huggingface_hub.set_client_factory(_http.default_client_factory)
    [url] = seen
    assert url.params.get_list("filter") == ["spectralkv", f"base_model:{BASE}"]
    assert url.params["sort"] == "downloads" and url.params["limit"] == "50"
    assert url.params["cardData"].lower() == "true"
    assert [c.repo_id for c in found] == ["org/smol-skv", "org/smol-skv-2bit"]


# -- without the network --------------------------------------------------------------------------------------------
@pytest.fixture
def cache(tiny_llama_calibration: SpectralKVConfig, tmp_path: Path) -> Path:
    """A local Hub cache holding one calibration at the root of a repo and one in a subfolder."""
    import dataclasses

    src = dataclasses.replace(tiny_llama_calibration, base_model=BASE).save_pretrained(tmp_path / "src")
    other = tiny_llama_calibration.save_pretrained(tmp_path / "other")
    root = tmp_path / "hub"
    _populate(root, "org/smol-skv", {SHA_MAIN: _files(src)}, {"main": SHA_MAIN})
    _populate(root, "org/variants", {SHA_MAIN: {**_files(src, "2bit/"), **_files(other, "tiny/")}},
              {"main": SHA_MAIN})
    return root


def test_cached_calibrations(cache: Path, tmp_path: Path) -> None:
    assert cached_calibrations(BASE, cache) == ["org/smol-skv", "org/variants/2bit"]
    assert cached_calibrations(None, cache) == ["org/smol-skv", "org/variants/2bit", "org/variants/tiny"]
    assert cached_calibrations(BASE, tmp_path / "no-cache") == []


def test_offline_explains_and_names_cached_calibrations(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def forbidden(*_: Any, **__: Any) -> None:
        raise AssertionError("no request offline")

    monkeypatch.setattr(HfApi, "list_models", forbidden)
    with pytest.raises(DiscoveryError) as info:
        find_calibrations(BASE, cache_dir=cache)
    msg = str(info.value)
    assert "needs network access, and HF_HUB_OFFLINE is set" in msg
    assert "org/smol-skv, org/variants/2bit" in msg and "org/variants/tiny" not in msg
    with pytest.raises(DiscoveryError, match="No calibration for it is in your local Hub cache"):
        find_calibrations("nobody/nothing", cache_dir=cache)


@pytest.mark.parametrize("error", [httpx2.ConnectError("[Errno -3] name resolution failed"),
                                   httpx2.ConnectTimeout("timed out"), ConnectionError("refused")])
def test_unreachable_hub(error: Exception, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def list_models(self: HfApi, **_: Any) -> Iterator[ModelInfo]:
        raise error
        yield  # a generator, like the real one

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "list_models", list_models)
    with pytest.raises(DiscoveryError, match=f"needs network access, and the Hub could not be reached "
                                             f"\\({type(error).__name__}"):
        find_calibrations(BASE, cache_dir=tmp_path)


def test_hub_error_is_not_called_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def list_models(self: HfApi, **_: Any) -> Iterator[ModelInfo]:
        request = httpx2.Request("GET", "https://huggingface.co/api/models")
        raise HfHubHTTPError("500 Server Error", response=httpx2.Response(500, request=request))
        yield

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "list_models", list_models)
    with pytest.raises(DiscoveryError, match="The Hub refused the listing: 500 Server Error"):
        find_calibrations(BASE)


def test_cli_list_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                          ) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert main(["list", "--base-model", BASE]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Listing calibrations on the Hugging Face Hub needs network access")
