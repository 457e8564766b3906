"""Command line: ``spectralkv calibrate | inspect | generate | demo | eval``."""

from __future__ import annotations

import argparse
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


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate
    from .inspection import summary_text
    from .models import load_model

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {str(out)!r} exists and is not a folder; choose another path.")
    model, tok = load_model(args.model, args.gguf_file)
    cfg = calibrate(model, tok, bits=args.bits, text=args.text, tokens=args.tokens, heldout_tokens=args.heldout_tokens,
                    seq_len=args.seq_len, sink_tokens=args.sink_tokens, window=args.window, seed=args.seed)
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
    report = out.past_key_values.memory_report()
    print(f"\nPrompt: {prompt}")
    print(f"\n[fp cache, {t_ref:.1f} s]\n{tok.decode(ref[0, n:], skip_special_tokens=True)}")
    print(f"\n[spectralkv {cfg.bits:g} bits/coord, window {report and window if window is not None else cfg.window}, "
          f"{t_skv:.1f} s]\n{tok.decode(out.sequences[0, n:], skip_special_tokens=True)}")
    print(f"\nKV cache after {report['seq_length']} tokens: {report['resident_bytes'] / 1024:.0f} KiB resident "
          f"(codes {report['codes_bytes'] / 1024:.0f} KiB, scales {report['metadata_bytes'] / 1024:.0f} KiB, "
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectralkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="calibrate a model and write a Hub-ready calibration folder")
    _add_model_args(p)
    p.add_argument("--text", default="pydoc", help="'pydoc' (stdlib pydoc_data.topics) or a UTF-8 text file")
    p.add_argument("--tokens", type=int, default=32768, help="fitting tokens (default 32768)")
    p.add_argument("--heldout-tokens", type=int, default=2048, help="held-out calibration tokens (default 2048)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", type=_budget, default=3.0, help="default budget, bits per coordinate in (0, 8]")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window", type=int, default=32, help="default full-precision recent window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME")
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

    try:
        from .evaluation.runner import add_eval_arguments, run_from_args
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
