"""Publishing: the folder is validated, measured (quick evaluation) and given a card with the results and Hub
metadata, then pushed in one commit with ``HfApi`` (patched at the class: no network). Branches, pull requests and
subfolders; a push that fails midway or is interrupted leaves the folder complete and prints the exact command that
resumes, and that command works."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import httpx2
import pytest
import torch
from conftest import ByteTokenizer
from huggingface_hub import HfApi, ModelCard

import spectralkv.publish as publish_mod
from spectralkv.cli import main
from spectralkv.config import CARD_NAME, CONFIG_NAME, TENSORS_NAME, SpectralKVConfig
from spectralkv.publish import EVAL_NAME, PublishError, publish, read_evaluation, resume_command
from spectralkv.validate import validate_calibration

REPO = "me/tiny-skv"


class FakeRepo:
    """HfApi's create_repo / create_branch / file_exists / create_commit against an in-memory repo.

    A commit is all-or-nothing, as on the Hub: its files land only once every operation has been read. ``fail_after``
    makes the next commit raise after reading that many files (an upload cut off midway)."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}  # (branch, path) -> content
        self.calls: list[tuple[str, Any]] = []
        self.fail_after: int | None = None
        self.fail_with: BaseException = httpx2.ConnectError("connection reset by peer")
        self.read_before_failure: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        repo = self

        def create_repo(self: HfApi, repo_id: str, **kw: Any) -> str:
            repo.calls.append(("create_repo", (repo_id, kw, self.token)))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(self: HfApi, repo_id: str, *, branch: str, **kw: Any) -> None:
            repo.calls.append(("create_branch", (repo_id, branch, kw)))

        def file_exists(self: HfApi, repo_id: str, filename: str, *, revision: str | None = None, **kw: Any) -> bool:
            return (revision or "main", filename) in repo.files

        def create_commit(self: HfApi, repo_id: str, operations: Any, *, commit_message: str,
                          revision: str | None = None, create_pr: bool | None = None, **kw: Any) -> Any:
            ops = list(operations)
            repo.calls.append(("create_commit", (repo_id, [op.path_in_repo for op in ops], commit_message,
                                                 revision, create_pr)))
            staged = {}
            for i, op in enumerate(ops):
                if repo.fail_after is not None and i == repo.fail_after:
                    repo.fail_after = None
                    repo.read_before_failure = list(staged)
                    raise repo.fail_with
                staged[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
            branch = f"refs/pr/1 onto {revision or 'main'}" if create_pr else revision or "main"
            repo.files.update({(branch, p): data for p, data in staged.items()})
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc",
                                           "pr_url": f"https://huggingface.co/{repo_id}/discussions/1"
                                           if create_pr else None})()

        for name, fn in [("create_repo", create_repo), ("create_branch", create_branch),
                         ("file_exists", file_exists), ("create_commit", create_commit)]:
            monkeypatch.setattr(HfApi, name, fn)

    def calls_of(self, name: str) -> list[Any]:
        return [args for n, args in self.calls if n == name]

    def export(self, branch: str, prefix: str, dest: Path) -> Path:
        dest.mkdir(parents=True)
        for (b, path), data in self.files.items():
            if b == branch and path.startswith(prefix) and "/" not in path[len(prefix):]:
                (dest / path[len(prefix):]).write_bytes(data)
        return dest


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeRepo:
    repo = FakeRepo()
    repo.install(monkeypatch)
    return repo


@pytest.fixture(scope="module")
def evaluated(tiny_llama_calibration: SpectralKVConfig, tiny_llama: torch.nn.Module,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder prepared once with a real quick evaluation at 2 and 3 bits (tests copy it)."""
    folder = tmp_path_factory.mktemp("evaluated") / "cal"
    publish_mod.prepare_folder(folder, config=tiny_llama_calibration, repo_id=REPO,
                               load_model=lambda cfg: (tiny_llama, ByteTokenizer()), budgets=[2.0, 3.0],
                               log=lambda _: None)
    return folder


@pytest.fixture
def folder(evaluated: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(evaluated, tmp_path / "cal"))


@pytest.fixture
def no_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: Any, **__: Any) -> None:
        raise AssertionError("the evaluation should have been reused")

    monkeypatch.setattr(publish_mod, "quick_evaluation", forbidden)


# -- end to end -------------------------------------------------------------------------------------------------
def test_publish_end_to_end(hub: FakeRepo, tiny_llama_calibration: SpectralKVConfig, tiny_llama: torch.nn.Module,
                            tmp_path: Path) -> None:
    logged: list[str] = []
    result = publish(REPO, tmp_path / "cal", config=tiny_llama_calibration, token="hf_fake", private=True,
                     load_model=lambda cfg: (tiny_llama, ByteTokenizer()), budgets=[2.0, 3.0], log=logged.append)
    assert result.url == f"https://huggingface.co/{REPO}/commit/abc"
    assert hub.calls_of("create_repo") == [(REPO, {"private": True, "exist_ok": True}, "hf_fake")]
    assert hub.calls_of("create_branch") == []
    [(repo_id, paths, message, revision, create_pr)] = hub.calls_of("create_commit")
    assert sorted(paths) == sorted([CONFIG_NAME, TENSORS_NAME, EVAL_NAME, CARD_NAME])
    assert (repo_id, revision, create_pr) == (REPO, None, False)
    uploaded = hub.export("main", "", tmp_path / "uploaded")
    assert validate_calibration(uploaded, model=tiny_llama).ok
    loaded = SpectralKVConfig.from_pretrained(uploaded)
    assert all(torch.equal(loaded.tensors[n], t) for n, t in tiny_llama_calibration.tensors.items())

    evaluation = json.loads((uploaded / EVAL_NAME).read_text())
    assert [r["bits"] for r in evaluation["budgets"]] == [2.0, 3.0]
    for row in evaluation["budgets"]:
        assert row["bytes_per_token"] == pytest.approx(tiny_llama_calibration.bytes_per_token(row["bits"]))
        assert row["bits_per_coordinate"] <= row["bits"] + 1e-9
        assert row["ci95_pct"][0] <= row["dppl_pct"] <= row["ci95_pct"][1]
    assert evaluation["tensors_sha256"] == json.loads((uploaded / CONFIG_NAME).read_text())["tensors_sha256"]

    readme = (uploaded / CARD_NAME).read_text()
    card = ModelCard(readme).data
    assert card.library_name == "spectralkv" and card.base_model == "tiny-random-llama"
    assert card.to_dict()["base_model_relation"] == "adapter"
    assert {"spectralkv", "kv-cache", "3-bit"} <= set(card.tags)
    metrics = {(r.metric_type, r.metric_name): r.metric_value for r in card.eval_results}
    assert card.model_name == REPO
    for row in evaluation["budgets"]:
        b = f"{row['bits']:g}"
        assert metrics[("delta_perplexity", f"dPPL vs fp16 cache (%) @ {b} bits/coordinate")] == pytest.approx(
            row["dppl_pct"], abs=1e-4)
        assert f"| {row['bits']} | {row['bits_per_coordinate']:.3f} | {row['bytes_per_token']:.0f} |" in readme
    assert metrics[("perplexity", "perplexity, fp16 cache (reference)")] == pytest.approx(
        evaluation["reference_ppl"], abs=1e-4)
    assert f'from_pretrained("{REPO}", bits=3.0' in readme
    assert any("Quick evaluation at 2, 3 bits" in line for line in logged)


def test_branch_pull_request_and_subfolders(hub: FakeRepo, folder: Path, tmp_path: Path,
                                            tiny_llama_calibration: SpectralKVConfig, no_evaluation: None) -> None:
    """Two budgets as two subfolders of one repo, on a branch, as pull requests; the first variant also becomes the
    root card (the Hub reads metadata only there), the second leaves it alone."""
    publish(REPO, folder, path_in_repo="3bit", revision="variants", log=lambda _: None)
    assert hub.calls_of("create_branch") == [(REPO, "variants", {"exist_ok": True})]
    [(_, paths, _, revision, create_pr)] = hub.calls_of("create_commit")
    assert sorted(paths) == sorted(["3bit/" + n for n in (CONFIG_NAME, TENSORS_NAME, EVAL_NAME, CARD_NAME)]
                                   + [CARD_NAME])
    assert (revision, create_pr) == ("variants", False)
    readme = (folder / CARD_NAME).read_text()
    assert f'from_pretrained("{REPO}", subfolder="3bit", bits=3.0' in readme
    assert hub.files[("variants", CARD_NAME)] == readme.encode()

    two = tiny_llama_calibration.with_bits(2.0)
    two = dataclasses.replace(two, default_bits=2.0, tensors={
        **two.tensors, **{f"layers.{l}.{k}.bits": t for (l, k), t in two.allocation(2.0).items()}})
    hub.calls.clear()
    result = publish(REPO, tmp_path / "two", config=two, path_in_repo="2bit/", revision="variants", create_pr=True,
                     evaluate=False, commit_message="2-bit variant", log=lambda _: None)
    [(_, paths, message, revision, create_pr)] = hub.calls_of("create_commit")
    assert sorted(paths) == sorted("2bit/" + n for n in (CONFIG_NAME, TENSORS_NAME, CARD_NAME))
    assert (message, revision, create_pr) == ("2-bit variant", "variants", True)
    assert result.url.endswith("/discussions/1")
    exported = hub.export("refs/pr/1 onto variants", "2bit/", tmp_path / "exported")
    assert SpectralKVConfig.from_pretrained(exported).default_bits == 2.0
    assert "## Measured quality" not in (exported / CARD_NAME).read_text()


# -- failures -----------------------------------------------------------------------------------------------------
def test_upload_failing_midway_then_resume(hub: FakeRepo, folder: Path, tmp_path: Path, no_evaluation: None,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != CARD_NAME}
    hub.fail_after = 2
    with pytest.raises(PublishError) as info:
        publish(REPO, folder, revision="dev", path_in_repo="v1", commit_message="first try", log=lambda _: None)
    msg = str(info.value)
    assert len(hub.read_before_failure) == 2 and not hub.files, "nothing was committed"
    assert "ConnectError: connection reset by peer" in msg and "is complete" in msg
    expected = resume_command(REPO, folder, revision="dev", path_in_repo="v1", commit_message="first try")
    assert info.value.resume_command == expected and msg.endswith(expected)
    assert shlex.split(expected) == ["spectralkv", "push", REPO, "--from", str(folder), "--revision", "dev",
                                     "--path-in-repo", "v1", "--commit-message", "first try"]
    # the local folder is complete: valid, evaluated, and carded for where it goes
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert {n: b for n, b in after.items() if n != CARD_NAME} == before
    assert validate_calibration(folder).ok and read_evaluation(folder) is not None
    readme = (folder / CARD_NAME).read_text()
    assert "## Measured quality" in readme and f'from_pretrained("{REPO}", subfolder="v1"' in readme

    # the printed command finishes the job (no model needed: the evaluation is reused)
    assert main(shlex.split(expected)[1:]) == 0
    assert "Published" in capsys.readouterr().out
    uploaded = hub.export("dev", "v1/", tmp_path / "uploaded")
    assert {p.name: p.read_bytes() for p in uploaded.iterdir()} == after
    assert [c[2] for c in hub.calls_of("create_commit")] == ["first try", "first try"]


def test_cli_failure_prints_the_resume_command(hub: FakeRepo, folder: Path, no_evaluation: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    hub.fail_after = 0
    hub.fail_with = httpx2.ReadTimeout("timed out")
    assert main(["push", REPO, "--from", str(folder), "--create-pr", "--private"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Upload to me/tiny-skv failed (ReadTimeout: timed out).")
    assert err.rstrip().endswith(shlex.join(["spectralkv", "push", REPO, "--from", str(folder), "--create-pr",
                                             "--private"]))


def test_interrupted_upload(hub: FakeRepo, folder: Path, no_evaluation: None,
                            capsys: pytest.CaptureFixture[str]) -> None:
    hub.fail_after = 1
    hub.fail_with = KeyboardInterrupt()
    logged: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        publish(REPO, folder, log=logged.append)
    assert logged[-1].startswith("Upload interrupted.") and logged[-1].endswith(resume_command(REPO, folder))
    hub.fail_after = 1
    assert main(["push", REPO, "--from", str(folder)]) == 130
    assert resume_command(REPO, folder) in capsys.readouterr().out
    assert validate_calibration(folder).ok


def test_invalid_folder_is_not_published(hub: FakeRepo, folder: Path) -> None:
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(PublishError, match="does not pass validation; nothing was published") as info:
        publish(REPO, folder, log=lambda _: None)
    assert "FAIL  no pickle files" in str(info.value)
    assert hub.calls == []


def test_bad_repo_id(hub: FakeRepo, folder: Path) -> None:
    with pytest.raises(PublishError, match="is not a Hub repo id"):
        publish("not a repo id", folder, log=lambda _: None)
    assert hub.calls == []


def test_stale_or_missing_evaluation(hub: FakeRepo, folder: Path, tiny_llama_calibration: SpectralKVConfig) -> None:
    """An evaluation made for other tensors is not reused; without one and without a model, say what to do."""
    data = json.loads((folder / EVAL_NAME).read_text())
    data["tensors_sha256"] = "0" * 64
    (folder / EVAL_NAME).write_text(json.dumps(data))
    assert read_evaluation(folder) is None
    with pytest.raises(PublishError, match="pass --model, or --no-eval"):
        publish(REPO, folder, log=lambda _: None)
    assert hub.calls == []
    result = publish(REPO, folder, evaluate=False, log=lambda _: None)
    assert result.evaluation is None
    assert resume_command(REPO, folder, evaluated=False).endswith("--no-eval")


def test_cli_push_calibrates_first(hub: FakeRepo, tiny_llama: torch.nn.Module, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`spectralkv push ORG/NAME --model ...` calibrates into --out, evaluates with the same model, and publishes."""
    monkeypatch.setattr("spectralkv.models.load_model", lambda *a, **k: (tiny_llama, ByteTokenizer()))
    out = tmp_path / "fresh"
    rc = main(["push", REPO, "--model", "tiny", "--out", str(out), "--tokens", "512", "--heldout-tokens", "128",
               "--seq-len", "128", "--bits", "2.5", "--eval-bits", "2.5"])
    assert rc == 0, capsys.readouterr().err
    assert [r["bits"] for r in json.loads((out / EVAL_NAME).read_text())["budgets"]] == [2.5]
    assert SpectralKVConfig.from_pretrained(hub.export("main", "", tmp_path / "up")).default_bits == 2.5


# -- the card -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["/models/llama-3", "./llama", "~/llama", "a/b/c"])
def test_card_leaves_a_local_base_model_out_of_the_metadata(tiny_llama_calibration: SpectralKVConfig, base: str
                                                            ) -> None:
    from spectralkv.card import render_card

    text = render_card(dataclasses.replace(tiny_llama_calibration, base_model=base), repo_id=REPO)
    data = ModelCard(text).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert data["library_name"] == "spectralkv"
    assert f"The base model was given as the local path `{base}`, not a Hub repo id" in text
    assert f"https://huggingface.co/{base}" not in text


def test_card_treats_an_existing_folder_as_local(tiny_llama_calibration: SpectralKVConfig, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``models/llama`` is a valid-looking repo id, but if it is a folder here it was a local path."""
    from spectralkv.card import is_hub_id

    monkeypatch.chdir(tmp_path)
    assert is_hub_id("models/llama")
    (tmp_path / "models" / "llama").mkdir(parents=True)
    assert not is_hub_id("models/llama")
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
