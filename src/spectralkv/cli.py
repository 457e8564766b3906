"""Command line: ``spectralkv calibrate | inspect | generate | demo | eval | validate | push | list``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_OUT = "artifacts/smollm2-135m-instruct-skv"
DEFAULT_PROMPT = "Explain in two sentences what a key-value cache does in a transformer."


def _budget(value: str) -> float:
    from .allocation import check_budget

    try:
        return check_budget(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model, for GGUF checkpoints")


def _add_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default="pydoc", help="'pydoc' (stdlib pydoc_data.topics) or a UTF-8 text file")
    p.add_argument("--tokens", type=int, default=32768, help="fitting tokens (default 32768)")
    p.add_argument("--heldout-tokens", type=int, default=2048, help="held-out calibration tokens (default 2048)")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="tokens per calibration sequence; about the contexts you serve (default 2048)")
    p.add_argument("--bits", type=_budget, default=3.0, help="default budget, bits per coordinate in (0, 8]")
    p.add_argument("--profile-budgets", type=_budget, nargs="*", default=None, metavar="B",
                   help="other budgets to re-fit the per-layer K/V weights at; each is kept only where it lowers the "
                        "held-out error there (default: 2 2.5 3 4; none: pass the flag alone)")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window", type=int, default=32, help="default full-precision recent window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--position-centring", choices=("auto", "rope", "none"), default="auto",
                   help="'rope': centre each key on the pre-RoPE key mean rotated to its position (much lower error "
                        "beyond the calibration's sequence length); 'none': on its post-RoPE mean; 'auto' (default): "
                        "'rope' where the model's rotary embedding allows it")
    p.add_argument("--scale-format", choices=("log8", "fp16"), default="log8",
                   help="how a per-token scale is stored where the calibration picks one: 'log8' (default), one "
                        "byte on a calibrated log scale; 'fp16', two bytes")
    p.add_argument("--head-group", type=int, default=1,
                   help="KV heads coded in one basis (a divisor of the model's KV heads; default 1: a basis per head). "
                        "A shared basis captures the correlations between heads (on SmolLM2 all 3 heads in one basis "
                        "cut the held-out error by 41-50%% at 2-4 bits); the fused decode kernels need 1")


def _calibrate_from_args(model: Any, tok: Any, args: argparse.Namespace) -> Any:
    from .calibrate import PROFILE_BUDGETS, calibrate

    budgets = PROFILE_BUDGETS if args.profile_budgets is None else tuple(args.profile_budgets)
    return calibrate(model, tok, bits=args.bits, text=args.text, tokens=args.tokens, heldout_tokens=args.heldout_tokens,
                     seq_len=args.seq_len, sink_tokens=args.sink_tokens, window=args.window, seed=args.seed,
                     profile_budgets=budgets,
                     position_centring=None if args.position_centring == "none" else args.position_centring,
                     scale_format=args.scale_format, head_group=args.head_group)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .inspection import summary_text
    from .models import load_model

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {str(out)!r} exists and is not a folder; choose another path.")
    model, tok = load_model(args.model, args.gguf_file)
    cfg = _calibrate_from_args(model, tok, args)
    cfg.save_pretrained(out)
    print(summary_text(cfg))
    print(f"\nSaved calibration to {out}")
    if args.push_to_hub:
        info = cfg.push_to_hub(args.push_to_hub)
        print(f"Pushed to https://huggingface.co/{args.push_to_hub} ({info})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .config import SpectralKVConfig
    from .inspection import plot_calibration, summary_text

    cfg = SpectralKVConfig.from_pretrained(args.calibration, revision=args.revision, bits=args.bits)
    print(summary_text(cfg))
    png = Path(args.plot or (Path(args.calibration) / "spectrum.png" if Path(args.calibration).is_dir()
                             else "spectrum.png"))
    plot_calibration(cfg, png)
    print(f"\nWrote {png}")
    return 0


def _generate(model: Any, tok: Any, cfg: Any, prompt: str, max_new_tokens: int, window: int | None) -> None:
    import time

    import torch

    from .compat import output_cache
    from .hooks import attached

    msgs = [{"role": "user", "content": prompt}]
    if getattr(tok, "chat_template", None):
        inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        inputs = tok(prompt, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        t = time.perf_counter()
        ref = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        t_ref = time.perf_counter() - t
        with attached(model, cfg, window=window):
            t = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 return_dict_in_generate=True)
            t_skv = time.perf_counter() - t
    report = output_cache(out).memory_report()
    print(f"\nPrompt: {prompt}")
    print(f"\n[fp cache, {t_ref:.1f} s]\n{tok.decode(ref[0, n:], skip_special_tokens=True)}")
    print(f"\n[spectralkv {cfg.bits:g} bits/coord, window {report and window if window is not None else cfg.window}, "
          f"{t_skv:.1f} s]\n{tok.decode(out.sequences[0, n:], skip_special_tokens=True)}")
    print(f"\nKV cache after {report['seq_length']} tokens: {report['resident_bytes'] / 1024:.0f} KiB resident "
          f"(codes {report['codes_bytes'] / 1024:.0f} KiB, scales and outliers "
          f"{report['metadata_bytes'] / 1024:.0f} KiB, "
          f"fp sinks+window {(report['sinks_bytes'] + report['window_bytes']) / 1024:.0f} KiB) vs "
          f"{report['fp16_bytes'] / 1024:.0f} KiB for an fp16 cache; "
          f"compressed tokens cost {cfg.bytes_per_token():.0f} B/token vs {2 * cfg.coords_per_token} B/token fp16.")


def cmd_generate(args: argparse.Namespace) -> int:
    from .config import SpectralKVConfig
    from .models import load_model

    model, tok = load_model(args.model, args.gguf_file)
    cfg = SpectralKVConfig.from_pretrained(args.calibration, bits=args.bits, model=model)
    _generate(model, tok, cfg, args.prompt, args.max_new_tokens, args.window)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: calibrate the embedded default model, summarise, generate once compressed."""
    from .calibrate import calibrate
    from .config import SpectralKVConfig
    from .inspection import plot_calibration, summary_text
    from .models import load_model

    model, tok = load_model()
    cfg = calibrate(model, tok, bits=args.bits, tokens=args.tokens)
    out = Path(args.out)
    cfg.save_pretrained(out)
    cfg = SpectralKVConfig.from_pretrained(out, model=model)  # exactly what a user would load
    print(summary_text(cfg))
    png = plot_calibration(cfg, out / "spectrum.png")
    print(f"\nSaved calibration to {out} (plot: {png})")
    _generate(model, tok, cfg, args.prompt, args.max_new_tokens, None)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate_calibration

    report = validate_calibration(args.calibration, model=args.model, gguf_file=args.gguf_file,
                                  revision=args.revision, subfolder=args.subfolder)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def _base_model_loader(model: str | None, gguf_file: str | None, loaded: tuple[Any, Any] | None = None) -> Any:
    """``load_model(cfg)`` for publishing: the model already loaded, else ``--model``, else the calibration's base
    model (the embedded SmolLM2 for its Hub id)."""
    from .models import DEFAULT_MODEL_HUB_ID, load_model

    def load(cfg: Any) -> tuple[Any, Any]:
        if loaded is not None:
            return loaded
        if model is not None:
            return load_model(model, gguf_file)
        return load_model(None if cfg.base_model == DEFAULT_MODEL_HUB_ID else cfg.base_model)

    return load


def cmd_push(args: argparse.Namespace) -> int:
    """Publish ``--from DIR`` as is (calibration options are then unused), or calibrate ``--model`` into ``--out``
    first; either way validate, evaluate (reusing a matching evaluation in the folder), render the card, push."""
    from .publish import PublishError, publish

    config, loaded = None, None
    if args.from_dir is not None:
        folder = Path(args.from_dir)
    else:
        from .models import load_model

        folder = Path(args.out or Path("artifacts") / args.repo_id.split("/")[-1])
        if folder.exists() and not folder.is_dir():
            raise SystemExit(f"error: --out {str(folder)!r} exists and is not a folder; choose another path.")
        loaded = load_model(args.model, args.gguf_file)
        config = _calibrate_from_args(*loaded, args)
    load = _base_model_loader(args.model, args.gguf_file, loaded)
    try:
        result = publish(args.repo_id, folder, config=config, load_model=load, evaluate=not args.no_eval,
                         reevaluate=args.reevaluate, budgets=args.eval_bits, revision=args.revision,
                         create_pr=args.create_pr, path_in_repo=args.path_in_repo, private=args.private or None,
                         token=args.token, commit_message=args.commit_message)
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the resume command has been printed
        return 130
    print(f"Published {folder} to {result.url}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .discovery import find_calibrations

    found = find_calibrations(args.base_model, limit=args.limit)
    if args.json:
        print(json.dumps([{"repo_id": c.repo_id, "base_models": list(c.base_models), "budgets": list(c.budgets),
                           "dppl_pct": {f"{b:g}": v for b, v in c.dppl_pct.items()}, "downloads": c.downloads,
                           "likes": c.likes,
                           "last_modified": c.last_modified.isoformat() if c.last_modified else None}
                          for c in found], indent=2))
        return 0
    if not found:
        target = f" for {args.base_model}" if args.base_model else ""
        print(f"No spectralkv calibrations found{target} on the Hub. Publish one with "
              f"`spectralkv push ORG/NAME --model {args.base_model or 'MODEL'}`.")
        return 0
    for c in found:
        print(c.summary())
    print(f"\n{len(found)} calibration(s). Check one before use: spectralkv validate REPO --model MODEL")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectralkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="calibrate a model and write a Hub-ready calibration folder")
    _add_model_args(p)
    _add_calibrate_args(p)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                   help="also upload (no evaluation; `spectralkv push` measures and publishes)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("inspect", help="print a calibration's spectrum summary and allocation, write a PNG")
    p.add_argument("calibration", help="calibration folder or Hub repo id")
    p.add_argument("--revision", default=None)
    p.add_argument("--bits", type=_budget, default=None)
    p.add_argument("--plot", default=None, help="PNG path (default: spectrum.png in the folder)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="generate with and without the compressed cache, side by side")
    _add_model_args(p)
    p.add_argument("--calibration", default=DEFAULT_OUT)
    p.add_argument("--bits", type=_budget, default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="calibrate the embedded SmolLM2-135M, summarise, and generate compressed")
    p.add_argument("--bits", type=_budget, default=3.0)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("validate", help="check a calibration folder or Hub repo without trusting it; exit 1 on failure")
    p.add_argument("calibration", help="calibration folder or Hub repo id")
    p.add_argument("--model", default=None, help="also compare the architecture fingerprint with this model "
                   "(Hub id, folder, or smollm2-135m; only its config is read)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--revision", default=None)
    p.add_argument("--subfolder", default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("push", help="calibrate (or take --from DIR), measure, write the card, and publish to the Hub")
    p.add_argument("repo_id", metavar="ORG/NAME", help="Hub repo to publish to (created if missing)")
    p.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                   help="publish this existing calibration folder instead of calibrating")
    _add_model_args(p)
    _add_calibrate_args(p)
    p.add_argument("--out", default=None, help="folder for a new calibration (default: artifacts/NAME)")
    p.add_argument("--eval-bits", type=_budget, nargs="+", default=None,
                   help="budgets of the quick evaluation (default: 2 3 4 and the calibration's own)")
    p.add_argument("--no-eval", action="store_true", help="publish without measured results")
    p.add_argument("--reevaluate", action="store_true", help="re-run the evaluation even if the folder has one")
    p.add_argument("--revision", default=None, metavar="BRANCH", help="push to this branch (created if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    p.add_argument("--path-in-repo", "--subfolder", dest="path_in_repo", default=None, metavar="SUBFOLDER",
                   help="upload into this folder of the repo (several budgets or variants in one repo)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--commit-message", default="Upload spectralkv calibration")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("list", help="list spectralkv calibrations on the Hub (needs network)")
    p.add_argument("--base-model", default=None, metavar="ORG/NAME", help="only calibrations made for this model")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    try:
        from .evaluation.cli import add_eval_arguments, run_from_args
    except ImportError:  # the evaluation harness is optional at import time
        pass
    else:
        p = sub.add_parser("eval", help="streaming perplexity, needle and fidelity vs baselines in one run")
        add_eval_arguments(p)
        p.set_defaults(func=lambda a: run_from_args(a) or 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import CalibrationFormatError
    from .fingerprint import IncompatibleCalibrationError, UnsupportedArchitectureError
    from .models import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CalibrationFormatError, IncompatibleCalibrationError, UnsupportedArchitectureError, ModelLoadError,
            ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
