"""Hub paths, without a network: a hand-built offline cache, an in-process fake Hub served through huggingface_hub's
own HTTP client, a missing repo offline, and push_to_hub with HfApi patched at the class."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import _http

from spectralkv.config import CONFIG_NAME, TENSORS_NAME, CalibrationFormatError, SpectralKVConfig

SHA_MAIN = "1" * 40
SHA_OLD = "2" * 40
SHA_HUB = "3" * 40


def _assert_same(a: SpectralKVConfig, b: SpectralKVConfig) -> None:
    assert set(a.tensors) == set(b.tensors)
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    assert a.to_json_dict() == b.to_json_dict()


@pytest.fixture(scope="module")
def calibrations(tiny_llama_calibration: SpectralKVConfig, tmp_path_factory: pytest.TempPathFactory
                 ) -> dict[str, Path]:
    """Two distinguishable calibration folders: the current one and an 'older revision' (another window)."""
    root = tmp_path_factory.mktemp("hub-src")
    old = dataclasses.replace(tiny_llama_calibration, window=64)
    return {"main": tiny_llama_calibration.save_pretrained(root / "main"), "old": old.save_pretrained(root / "old")}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _populate(cache: Path, repo_id: str, snapshots: dict[str, dict[str, Path]], refs: dict[str, str]) -> None:
    """The huggingface_hub cache layout: blobs named by content hash, snapshot files symlinked to them."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for sha, files in snapshots.items():
        for rel, src in files.items():
            data = src.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / sha / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(blob)
    for name, sha in refs.items():
        ref = repo / "refs" / name
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)


def _files(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + p.name: p for p in folder.iterdir()}


# -- (1) a pre-populated cache, offline ---------------------------------------------------------------------------
@pytest.mark.usefixtures("offline")
def test_offline_cache_main_revision_and_subfolder(
    calibrations: dict[str, Path], tiny_llama_calibration: SpectralKVConfig, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    _populate(
        cache, "org/name",
        {SHA_MAIN: {**_files(calibrations["main"]), **_files(calibrations["old"], "variants/wide/")},
         SHA_OLD: _files(calibrations["old"])},
        {"main": SHA_MAIN, "v0": SHA_OLD},
    )
    cfg = SpectralKVConfig.from_pretrained("org/name", cache_dir=cache)
    _assert_same(cfg, tiny_llama_calibration)
    assert cfg.window == 32
    by_sha = SpectralKVConfig.from_pretrained("org/name", cache_dir=cache, revision=SHA_OLD)
    assert by_sha.window == 64
    by_branch = SpectralKVConfig.from_pretrained("org/name", cache_dir=cache, revision="v0", local_files_only=True)
    assert by_branch.window == 64
    sub = SpectralKVConfig.from_pretrained("org/name", cache_dir=cache, subfolder="variants/wide", bits=2.0)
    assert sub.window == 64 and sub.bits == 2.0
    with pytest.raises(CalibrationFormatError, match="revision v9"):
        SpectralKVConfig.from_pretrained("org/name", cache_dir=cache, revision="v9")


@pytest.mark.usefixtures("offline")
def test_offline_missing_repo_says_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(CalibrationFormatError) as info:
        SpectralKVConfig.from_pretrained("org/missing", cache_dir=tmp_path / "empty-cache")
    msg = str(info.value)
    assert "hf download org/missing" in msg and "not in the local Hub cache" in msg


@pytest.mark.usefixtures("offline")
def test_offline_cache_with_tampered_tensors(calibrations: dict[str, Path], tmp_path: Path) -> None:
    """Files from the Hub cache get the same validation as local folders."""
    bad = tmp_path / "bad"
    shutil.copytree(calibrations["main"], bad)
    (bad / TENSORS_NAME).write_bytes((bad / TENSORS_NAME).read_bytes()[:-1] + b"\x00")
    _populate(tmp_path / "hub", "org/tampered", {SHA_MAIN: _files(bad)}, {"main": SHA_MAIN})
    with pytest.raises(CalibrationFormatError, match="does not match the sha256"):
        SpectralKVConfig.from_pretrained("org/tampered", cache_dir=tmp_path / "hub")


# -- (2) an in-process fake Hub ----------------------------------------------------------------------------------
class FakeHub:
    """Serves ``{repo_id: {revision: {path: bytes}}}`` the way the Hub's resolve endpoint does (HEAD and GET)."""

    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append((request.method, request.url.path))
        parts = request.url.path.strip("/").split("/")
        if "resolve" not in parts:
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})
        i = parts.index("resolve")
        repo_id, revision, path = "/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2 :])
        if repo_id not in self.repos:
            return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, json={"error": "Repo not found"})
        commit = SHA_HUB if revision == "main" else revision.ljust(40, "0")[:40]
        files = self.repos[repo_id].get(revision)
        if files is None or path not in files:
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit},
                                   json={"error": "Entry not found"})
        body = files[path]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                   "Content-Length": str(len(body))}
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else body)


@pytest.fixture
def fake_hub(calibrations: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    def read(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    hub = FakeHub({"org/remote": {"main": read(calibrations["main"]), "v1": read(calibrations["old"])},
                   "org/not-a-calibration": {"main": {"README.md": b"hello"}}})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # the real client's request hook is kept: it is what enforces offline mode in huggingface_hub 2.x
    huggingface_hub.set_client_factory(lambda: httpx2.Client(
        transport=httpx2.MockTransport(hub), event_hooks={"request": [_http.hf_request_event_hook]}))
    try:
        yield hub
    finally:
        huggingface_hub.set_client_factory(_http.default_client_factory)


def test_fake_hub_download_then_offline_reuse(
    fake_hub: FakeHub, tiny_llama_calibration: SpectralKVConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    cfg = SpectralKVConfig.from_pretrained("org/remote", cache_dir=cache)
    _assert_same(cfg, tiny_llama_calibration)
    fetched = {path for method, path in fake_hub.requests if method == "GET"}
    assert fetched == {f"/org/remote/resolve/main/{CONFIG_NAME}", f"/org/remote/resolve/main/{TENSORS_NAME}"}
    assert not any(p.endswith("README.md") for _, p in fake_hub.requests), "only JSON and safetensors are fetched"
    snapshot = cache / "models--org--remote" / "snapshots" / SHA_HUB
    assert sorted(p.name for p in snapshot.iterdir()) == sorted([CONFIG_NAME, TENSORS_NAME])
    assert (cache / "models--org--remote" / "refs" / "main").read_text() == SHA_HUB
    # the downloaded cache then serves offline, with no request at all
    fake_hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _assert_same(SpectralKVConfig.from_pretrained("org/remote", cache_dir=cache), tiny_llama_calibration)
    assert fake_hub.requests == []


def test_fake_hub_revision(fake_hub: FakeHub, tmp_path: Path) -> None:
    cfg = SpectralKVConfig.from_pretrained("org/remote", revision="v1", cache_dir=tmp_path / "hub")
    assert cfg.window == 64
    assert all("/resolve/v1/" in path for _, path in fake_hub.requests)


def test_fake_hub_repo_without_calibration(fake_hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(CalibrationFormatError, match="has no spectralkv_config.json.* not a spectralkv calibration"):
        SpectralKVConfig.from_pretrained("org/not-a-calibration", cache_dir=tmp_path / "hub")


def test_fake_hub_missing_repo(fake_hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(CalibrationFormatError, match="Could not fetch calibration 'org/nope' from the Hub"):
        SpectralKVConfig.from_pretrained("org/nope", cache_dir=tmp_path / "hub")


def test_client_factory_restored_after_fake_hub() -> None:
    """Runs after the fake-Hub tests: the global client is the real one again."""
    assert _http._GLOBAL_CLIENT_FACTORY is _http.default_client_factory


# -- (4) push_to_hub ------------------------------------------------------------------------------------------
@pytest.fixture
def patched_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    calls: dict[str, Any] = {"uploaded": tmp_path / "uploaded"}

    def create_repo(self: HfApi, repo_id: str, **kwargs: Any) -> str:
        calls["create_repo"] = (self.token, repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self: HfApi, **kwargs: Any) -> str:
        calls["upload_folder"] = (self.token, kwargs)
        shutil.copytree(kwargs["folder_path"], calls["uploaded"])
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub(patched_api: dict[str, Any], tiny_llama_calibration: SpectralKVConfig) -> None:
    out = tiny_llama_calibration.push_to_hub("me/tiny-skv", private=True, token="hf_fake", revision="dev",
                                             commit_message="calibrate")
    assert out == "commit-info"
    token, repo_id, kwargs = patched_api["create_repo"]
    assert (token, repo_id) == ("hf_fake", "me/tiny-skv")
    assert kwargs.get("exist_ok") is True and kwargs.get("private") is True
    token, kwargs = patched_api["upload_folder"]
    assert token == "hf_fake"
    assert (kwargs["repo_id"], kwargs["revision"], kwargs["commit_message"]) == ("me/tiny-skv", "dev", "calibrate")
    uploaded: Path = patched_api["uploaded"]
    assert sorted(p.name for p in uploaded.iterdir()) == sorted([CONFIG_NAME, TENSORS_NAME, "README.md"])
    _assert_same(SpectralKVConfig.from_pretrained(uploaded), tiny_llama_calibration)
    readme = (uploaded / "README.md").read_text()
    assert 'from_pretrained("me/tiny-skv"' in readme, "the card's usage snippet names the repo pushed to"
    assert json.loads((uploaded / CONFIG_NAME).read_text())["base_model"] == "tiny-random-llama"


def test_push_to_hub_temp_folder_removed(patched_api: dict[str, Any], tiny_llama_calibration: SpectralKVConfig
                                         ) -> None:
    tiny_llama_calibration.push_to_hub("me/tiny-skv")
    assert not Path(patched_api["upload_folder"][1]["folder_path"]).exists()


@pytest.mark.parametrize("bad", ["/no/such/folder/here", "a/b/c"])
def test_neither_folder_nor_repo_id(bad: str) -> None:
    with pytest.raises(CalibrationFormatError, match="neither a calibration folder nor a Hub repo id"):
        SpectralKVConfig.from_pretrained(bad)
