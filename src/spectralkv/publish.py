"""Publish a calibration to the Hugging Face Hub: validate, measure, write the card, push (``spectralkv push``).

Steps, each leaving the local folder usable on its own:

1. the calibration folder is written (fresh calibration) or taken as is (``--from DIR``), and checked with
   :func:`spectralkv.validate.validate_calibration`: nothing that would be refused on load is published;
2. a quick evaluation (:func:`quick_evaluation`: streaming perplexity delta vs an fp16 cache per budget, and bytes per
   token) is written to ``spectralkv_eval.json``, tied to the tensors' sha256 so a later push reuses it only for the
   same tensors;
3. ``README.md`` is rendered with the measured table and the Hub metadata (``library_name``, ``base_model``,
   ``base_model_relation``, tags, ``model-index``);
4. one Hub commit with ``HfApi`` (all files or none): to a branch (``revision``, created if missing), as a pull
   request (``create_pr``), and/or into a subfolder (``path_in_repo``) so several budgets or variants share a repo.

If the push fails or is interrupted, the folder is already complete and the error says the exact command that
resumes (``spectralkv push REPO --from DIR ...``: no recalibration, and the evaluation is reused).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import CARD_NAME, CONFIG_NAME, TENSORS_NAME, SpectralKVConfig

EVAL_NAME = "spectralkv_eval.json"
ARTIFACT_FILES = (CONFIG_NAME, TENSORS_NAME, EVAL_NAME, CARD_NAME)
DEFAULT_EVAL_BUDGETS = (2.0, 3.0, 4.0)
DEFAULT_COMMIT_MESSAGE = "Upload spectralkv calibration"


class PublishError(RuntimeError):
    """Publishing stopped; the message says why and, once the folder is complete, how to resume."""

    def __init__(self, message: str, resume_command: str | None = None) -> None:
        super().__init__(message)
        self.resume_command = resume_command


@dataclass
class PublishResult:
    folder: Path
    repo_id: str
    revision: str | None
    path_in_repo: str | None
    commit: Any
    evaluation: dict[str, Any] | None

    @property
    def url(self) -> str:
        return str(getattr(self.commit, "pr_url", None) or getattr(self.commit, "commit_url", None)
                   or f"https://huggingface.co/{self.repo_id}")


# -- evaluation -------------------------------------------------------------------------------------------------
def eval_budgets(config: SpectralKVConfig, budgets: Sequence[float] | None = None) -> list[float]:
    """The budgets to evaluate: ``budgets``, or 2, 3, 4 and the calibration's default; those it can serve."""
    wanted = budgets if budgets else (*DEFAULT_EVAL_BUDGETS, config.default_bits)
    return sorted({float(b) for b in wanted if config.min_bits < float(b) <= 8})


def quick_evaluation(model: Any, tokenizer: Any, config: SpectralKVConfig, budgets: Sequence[float] | None = None,
                     *, settings: Any = None, progress: bool = False) -> dict[str, Any]:
    """Perplexity delta vs an fp16 cache and bytes per token at each budget, in the harness's quick mode.

    A thin adapter over :func:`spectralkv.evaluation.run_evaluation` (``methods=["spectralkv"]``,
    ``tasks=("perplexity",)``, ``EvalSettings.quick()`` unless ``settings`` is given) that keeps what the card and
    the ``model-index`` need. Returns a JSON-serialisable dict (what ``spectralkv_eval.json`` holds)."""
    from . import __version__
    from .evaluation import EvalSettings, run_evaluation

    settings = replace(settings or EvalSettings.quick(), window=config.window, sink_tokens=config.sink_tokens)
    wanted = eval_budgets(config, budgets)
    if not wanted:
        raise ValueError(f"No budget to evaluate: choose budgets in ({config.min_bits:.3f}, 8].")
    results = run_evaluation(model, tokenizer, methods=["spectralkv"], budgets=wanted, calibration=config,
                             settings=settings, tasks=("perplexity",), progress=progress)
    runs = {r["label"]: r for r in results["runs"]}
    ref = runs["fp16"]["perplexity"]
    ps = settings.perplexity
    rows = []
    for b in wanted:
        run = runs.get(f"spectralkv@{b:g}")
        if run is None:
            continue
        p = run["perplexity"]
        measured = run.get("bits_per_coordinate")
        rows.append({
            "bits": b,
            "bits_per_coordinate": float(measured) if measured is not None else config.effective_bits(b),
            "bytes_per_token": config.bytes_per_token(b),
            "ppl": p["ppl"],
            "dppl_pct": p["dppl_pct"],
            "ci95_pct": list(p["ci95_pct"]),
        })
    return {
        "method": "streaming perplexity (spectralkv.evaluation, quick mode)",
        "model": results["model"],
        "text": settings.text,
        "windows": ps.windows,
        "prefill": ps.prefill,
        "decode": ps.decode,
        "scored_tokens": ref["scored_tokens"],
        "reference_ppl": ref["ppl"],
        "window": settings.window,
        "sink_tokens": settings.sink_tokens,
        "fp16_bytes_per_token": 2 * config.coords_per_token,
        "budgets": rows,
        "skipped": results["skipped"],
        "settings": results["settings"],
        "environment": results["environment"],
        "spectralkv_version": __version__,
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _tensors_sha(folder: Path) -> str:
    return str(json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))["tensors_sha256"])


def read_evaluation(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's saved evaluation, if there is one and it was made for the folder's current tensors."""
    path = Path(folder) / EVAL_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("tensors_sha256") != _tensors_sha(Path(folder)):
        return None
    return data


# -- the local folder -------------------------------------------------------------------------------------------
def prepare_folder(
    folder: str | os.PathLike,
    *,
    config: SpectralKVConfig | None = None,
    repo_id: str | None = None,
    path_in_repo: str | None = None,
    evaluate: bool = True,
    reevaluate: bool = False,
    load_model: Callable[[SpectralKVConfig], tuple[Any, Any]] | None = None,
    budgets: Sequence[float] | None = None,
    settings: Any = None,
    log: Callable[[str], None] = print,
) -> tuple[SpectralKVConfig, dict[str, Any] | None]:
    """Write or check the calibration folder, evaluate it (or reuse its evaluation) and render its card.

    ``config`` (a fresh calibration) is saved into ``folder`` first; otherwise ``folder`` must already hold one.
    ``load_model(config) -> (model, tokenizer)`` is called only if an evaluation must run. Raises
    :class:`PublishError` with the validation report when the folder would be refused on load."""
    from .card import render_card
    from .validate import validate_calibration

    out = Path(folder)
    if config is not None:
        config.save_pretrained(out, card=False)
    report = validate_calibration(out)
    if not report.ok:
        raise PublishError(f"{out} does not pass validation; nothing was published.\n{report.format()}")
    cfg = SpectralKVConfig.from_pretrained(out)
    evaluation = None if reevaluate else read_evaluation(out)
    if evaluation is not None:
        log(f"Reusing the evaluation in {out / EVAL_NAME} (made for these tensors).")
    elif evaluate:
        if load_model is None:
            raise PublishError("An evaluation is needed but no model was given: pass --model, or --no-eval to "
                               "publish without measured results.")
        model, tokenizer = load_model(cfg)
        cfg.check_compatible(model)
        log(f"Quick evaluation at {', '.join(f'{b:g}' for b in eval_budgets(cfg, budgets))} bits per coordinate...")
        evaluation = quick_evaluation(model, tokenizer, cfg, budgets, settings=settings)
        evaluation["tensors_sha256"] = _tensors_sha(out)
        _write_atomic(out / EVAL_NAME, json.dumps(evaluation, indent=2, sort_keys=True) + "\n")
    _write_atomic(out / CARD_NAME, render_card(cfg, repo_id=repo_id, evaluation=evaluation, subfolder=path_in_repo))
    return cfg, evaluation


# -- the push ---------------------------------------------------------------------------------------------------
def resume_command(repo_id: str, folder: str | os.PathLike, *, revision: str | None = None, create_pr: bool = False,
                   path_in_repo: str | None = None, private: bool | None = None, commit_message: str | None = None,
                   evaluated: bool = True) -> str:
    """The ``spectralkv push`` command that publishes an already prepared folder (the token is not repeated)."""
    args = ["spectralkv", "push", repo_id, "--from", str(folder)]
    if revision:
        args += ["--revision", revision]
    if create_pr:
        args.append("--create-pr")
    if path_in_repo:
        args += ["--path-in-repo", path_in_repo]
    if private:
        args.append("--private")
    if commit_message and commit_message != DEFAULT_COMMIT_MESSAGE:
        args += ["--commit-message", commit_message]
    if not evaluated:
        args.append("--no-eval")
    return shlex.join(args)


def push_folder(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None, create_pr: bool = False,
                path_in_repo: str | None = None, private: bool | None = None, token: str | None = None,
                commit_message: str = DEFAULT_COMMIT_MESSAGE) -> Any:
    """Upload the folder's artifact files (only those: never stray files) in one commit. With ``path_in_repo``,
    the card also becomes the repo's root README.md if the repo has none yet (the Hub reads metadata only there)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    src = Path(folder)
    prefix = path_in_repo.strip("/") + "/" if path_in_repo and path_in_repo.strip("/") else ""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=str(src / name))
           for name in ARTIFACT_FILES if (src / name).is_file()]
    if prefix and not api.file_exists(repo_id, CARD_NAME, revision=revision):
        ops.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(src / CARD_NAME)))
    return api.create_commit(repo_id, ops, commit_message=commit_message, revision=revision, create_pr=create_pr)


def publish(
    repo_id: str,
    folder: str | os.PathLike,
    *,
    config: SpectralKVConfig | None = None,
    load_model: Callable[[SpectralKVConfig], tuple[Any, Any]] | None = None,
    evaluate: bool = True,
    reevaluate: bool = False,
    budgets: Sequence[float] | None = None,
    settings: Any = None,
    revision: str | None = None,
    create_pr: bool = False,
    path_in_repo: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    log: Callable[[str], None] = print,
) -> PublishResult:
    """Prepare ``folder`` (see :func:`prepare_folder`) and push it to ``repo_id`` (see :func:`push_folder`).

    On a failed push raises :class:`PublishError` whose message (and ``resume_command``) gives the exact command that
    finishes the job from the complete local folder; on Ctrl-C logs the same and re-raises ``KeyboardInterrupt``."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise PublishError(f"{repo_id!r} is not a Hub repo id (ORG/NAME): {e}") from None
    cfg, evaluation = prepare_folder(folder, config=config, repo_id=repo_id, path_in_repo=path_in_repo,
                                     evaluate=evaluate, reevaluate=reevaluate, load_model=load_model,
                                     budgets=budgets, settings=settings, log=log)
    resume = resume_command(repo_id, folder, revision=revision, create_pr=create_pr, path_in_repo=path_in_repo,
                            private=private, commit_message=commit_message, evaluated=evaluation is not None)
    where = f"{repo_id}{'/' + path_in_repo.strip('/') if path_in_repo else ''}"
    log(f"Pushing {folder} to {where}{f' (branch {revision})' if revision else ''}"
        f"{' as a pull request' if create_pr else ''}...")

    def stopped(reason: str) -> str:
        return (f"{reason} The local folder {folder} is complete (config, tensors, "
                f"{'evaluation, ' if evaluation is not None else ''}card) and a Hub commit is all-or-nothing, so no "
                f"partial upload was committed. Resume with:\n  {resume}")

    try:
        commit = push_folder(folder, repo_id, revision=revision, create_pr=create_pr, path_in_repo=path_in_repo,
                             private=private, token=token, commit_message=commit_message)
    except KeyboardInterrupt:
        log(stopped("Upload interrupted."))
        raise
    except Exception as e:  # network, auth, server errors: all resumable from the folder
        raise PublishError(stopped(f"Upload to {repo_id} failed ({type(e).__name__}: {e})."), resume) from e
    return PublishResult(Path(folder), repo_id, revision, path_in_repo, commit, evaluation)


__all__ = ["EVAL_NAME", "PublishError", "PublishResult", "prepare_folder", "publish", "push_folder",
           "quick_evaluation", "read_evaluation", "resume_command"]
