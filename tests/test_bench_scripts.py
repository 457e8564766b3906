"""The benchmark scripts, checked without a GPU so they are ready to run on one without edits.

``scripts/bench_decode.py`` needs CUDA for every measurement, so its tests cover the command line, the no-GPU exit,
the timer's fallback when graph capture fails (with fake timing functions), and the derived columns, target checks
and Markdown report on hand-made rows. ``scripts/bench_generate.py`` also runs end to end on CPU with ``--tiny``, as
does ``scripts/bench_cpu_decode.py`` (the CPU path's own benchmark).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
NAN = float("nan")


def _load(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (not a package) once per session."""
    key = f"_bench_scripts_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="module")
def decode() -> ModuleType:
    return _load("bench_decode")


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return _load("bench_generate")


# -- command lines ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,flags", [
    ("bench_decode.py", ["--contexts", "--timer", "--no-cuda-graph", "--l2", "--copy-gb", "--target-context",
                         "--position-centring"]),
    ("bench_generate.py", ["--batches", "--context", "--find-max-batch", "--tiny", "--device", "--prefill-chunk"]),
    ("eval_outlier_slots.py", ["--calibration", "--slots", "--bits", "--windows"]),
    ("bench_cpu_decode.py", ["--contexts", "--batches", "--calibration", "--tiny", "--out"]),
    ("eval_weight_profiles.py", ["--calibration", "--bits", "--windows", "--out"]),
    ("eval_position_centring.py", ["--calibrations", "--bits", "--length", "--ranges", "--out"]),
    ("compare_calibrations.py", ["--baseline", "--candidate", "--labels", "--bits", "--windows", "--out"]),
])
def test_help(script: str, flags: list[str]) -> None:
    out = subprocess.run([sys.executable, str(SCRIPTS / script), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    missing = [f for f in flags if f not in out.stdout]
    assert not missing, f"--help does not mention {missing}"


def test_decode_parses(decode: ModuleType, tmp_path: Path) -> None:
    args = decode.parse_args(["--contexts", "1k", "128k", "--batches", "1", "16", "--bits", "2.5",
                              "--out", str(tmp_path)])
    assert args.contexts == [1024, 131072] and args.batches == [1, 16] and args.bits == [2.5]
    assert args.timer == "cudagraph" and args.l2 == "flush" and args.target_context == 32768  # graphs on by default
    assert args.methods == ["spectralkv", "fp16-flash", "fp16-sdpa", "dequant-sdpa"]
    assert decode.parse_args(["--no-cuda-graph"]).timer == "plain"
    assert decode.parse_args(["--l2", "warm", "--target-context", "16k"]).target_context == 16384
    for bad in (["--contexts", "lots"], ["--bits", "0"], ["--batches", "-1"], ["--copy-gb", "0"],
                ["--timer", "sometimes"], ["--methods", "fp8"], ["--outlier-fraction", "1.5"]):
        with pytest.raises(SystemExit) as e:
            decode.parse_args(bad)
        assert e.value.code == 2, bad
    q = decode.make_quantizer(2, 64, 2.5, token_scale=True)
    assert q.code_bits_per_token == 2 * 64 * 2.5
    assert [r.bits for r in q.regimes[0]] == [3, 2]
    assert decode.parse_args([]).outlier_fraction == 0.0


def test_decode_random_outliers(decode: ModuleType) -> None:
    """The benchmark's outliers have the library's layout and cap, and the reference attention reads them."""
    from spectralkv.kernels.ref import PackedSide, decode_attention_ref

    assert decode.random_outliers(2, 10, 256, 0.0, "cpu") is None
    o = decode.random_outliers(2, 400, 384, 0.01, "cpu")
    e = int(o.counts.long().sum())
    assert o.counts.shape == (2, 400) and o.index.dtype == torch.int16 and o.values.shape == (e,)
    assert int(o.counts.max()) <= max(2, math.ceil(4 * 3.84)) and abs(e / (800 * 384) - 0.01) < 0.002
    assert int(o.index.max()) < 384 and decode.random_outliers(1, 5, 256, 0.05, "cpu").index.dtype == torch.uint8
    qk, qv = decode.make_quantizer(3, 128, 2.5, True, seed=1), decode.make_quantizer(3, 128, 2.5, True, seed=2)
    kc = torch.randint(0, 256, (2, 400, qk.row_bytes), dtype=torch.uint8)
    ks = torch.rand(2, 400, 3).half() + 0.5
    q = torch.randn(2, 6, 128)
    with_o = decode_attention_ref(q, PackedSide(qk, kc, ks, o), PackedSide(qv, kc, ks, o))
    assert not torch.allclose(with_o, decode_attention_ref(q, PackedSide(qk, kc, ks), PackedSide(qv, kc, ks)))


def test_generate_parses(gen: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    full = gen.parse_args([])
    assert (full.device, full.context, full.batches, full.new_tokens, full.dtype) == ("cuda", 32768, [8], 128,
                                                                                     "float16")
    assert full.methods == ["fp16-dynamic", "fp16-static", "spectralkv", "spectralkv-static"]
    assert full.bits == [2.5, 4.0]
    assert full.flush_blocks == [1] and full.search_fill == "synthetic" and not full.search_only
    assert gen.model_shape(full) == gen.LLAMA_8B and gen.LLAMA_8B["num_hidden_layers"] == 32
    tiny = gen.parse_args(["--device", "cpu", "--tiny", "--context", "100"])
    assert (tiny.context, tiny.batches, tiny.dtype, tiny.window) == (100, [2], "float32", 8)  # user value kept
    assert gen.parse_args(["--context", "8k", "--layers", "4"]).context == 8192
    cases = {
        ("--device", "cpu"): "--device cpu needs --tiny",
        ("--new-tokens", "1"): "--new-tokens must be >= 2",
        ("--tiny", "--context", "10"): "must exceed --window + --sinks",
        ("--batches", "0"): "--batches must be positive",
        ("--prefill-chunk", "-1"): "--prefill-chunk must be >= 0",
        ("--context", "huge"): "not a size",
        ("--flush-blocks", "1", "0"): "--flush-blocks must be positive",
        ("--search-start", "0"): "--search-start must be >= 1",
        ("--search-only",): "--search-only needs --find-max-batch",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as e:
            gen.parse_args(list(argv))
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


# -- no GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,argv", [
    ("bench_decode", ["--contexts", "1k", "--batches", "1"]),
    ("bench_generate", ["--batches", "1", "--context", "1k", "--find-max-batch"]),
])
def test_without_gpu(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    module = _load(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert module.main([*argv, "--out", str(out)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


# -- bench_decode: timer, derived columns, targets, report ------------------------------------------------------------
def test_time_case_graph_fallback(decode: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Graph timing by default; a failed capture falls back to do_bench with a note; OOM is not swallowed."""
    calls: list[str] = []

    def graph_bench(fn: Any, rep: int, flush: Any) -> float:
        calls.append("graph")
        return 0.02

    def plain(fn: Any, warmup: int, rep: int) -> float:
        calls.append("plain")
        return 0.05

    def cudagraph(fn: Any, rep: int) -> float:
        calls.append("do_bench_cudagraph")
        return 0.01

    monkeypatch.setattr(decode, "graph_bench", graph_bench)
    monkeypatch.setattr(decode, "_do_bench", plain)
    monkeypatch.setattr(decode, "_do_bench_cudagraph", cudagraph)
    monkeypatch.setattr(decode, "_flush_buffer", lambda: None)
    fn = lambda: None  # noqa: E731

    assert decode.time_case(fn, decode.parse_args([])) == (0.02, "cudagraph+flush", True, "")
    assert decode.time_case(fn, decode.parse_args(["--l2", "warm"])) == (0.01, "do_bench_cudagraph", False, "")
    assert decode.time_case(fn, decode.parse_args(["--no-cuda-graph"])) == (0.05, "do_bench", True, "")
    assert calls == ["graph", "do_bench_cudagraph", "plain"]

    def broken(fn: Any, rep: int, flush: Any) -> float:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode, "graph_bench", broken)
    ms, timer, flushed, note = decode.time_case(fn, decode.parse_args([]))
    assert (ms, timer, flushed) == (0.05, "do_bench", True)
    assert "CUDA graph capture failed" in note and "stream is capturing" in note

    def oom(fn: Any, rep: int, flush: Any) -> float:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(decode, "graph_bench", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        decode.time_case(fn, decode.parse_args([]))


def test_flash_decoding_baseline_is_gqa_attention(decode: ModuleType) -> None:
    """The forced-backend fp16 baseline (GQA group folded into the query length) is the attention transformers
    computes, on each backend that runs here (CPU has FLASH and MATH)."""
    from torch.nn.attention import SDPBackend

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 32, generator=g)
    k, v = torch.randn(2, 2, 50, 32, generator=g), torch.randn(2, 2, 50, 32, generator=g)
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        torch.testing.assert_close(decode.sdpa_decode(q, k, v, backend), want, atol=1e-5, rtol=1e-5)
    cands, nbytes, why = decode._flash_candidates(q.half(), 2, 2, 50, 32)
    assert nbytes == 2 * 2 * 2 * 50 * 32 * 2
    if importlib.util.find_spec("flash_attn") is None:  # then the SDPA backends, and the row says why
        assert "flash_attn unavailable" in why
        assert [name.split()[2] for name, _ in cands] == ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"]
    else:
        assert [name.split()[0] for name, _ in cands] == ["flash_attn"]


def _drow(method: str, bits: float, batch: int, time_us: float, gbps: float, context: int = 32768) -> dict[str, Any]:
    return dict(method=method, bits=bits, batch=batch, context=context, time_us=time_us, gbps=gbps, impl="x",
                note="")


def decode_rows() -> list[dict[str, Any]]:
    return [
        _drow("fp16-flash", 16, 1, 100.0, 2000.0),
        _drow("fp16-sdpa", 16, 1, 150.0, 1300.0),
        _drow("spectralkv", 2.5, 1, 20.0, 2400.0),  # 5x, 80% of 3000 GB/s
        _drow("spectralkv", 4, 1, 50.0, 1500.0),  # 2x, 50%
        _drow("dequant-sdpa", 2.5, 1, 400.0, 100.0),
        # batch 4: flash ran out of memory, SDPA did not -> SDPA is the baseline
        _drow("fp16-flash", 16, 4, NAN, NAN),
        _drow("fp16-sdpa", 16, 4, 300.0, 2500.0),
        _drow("spectralkv", 2.5, 4, 60.0, 2700.0),  # 5x, 90%
        _drow("spectralkv", 4, 4, NAN, NAN),  # out of memory: FAIL, not skipped
        # another context: never part of the 32k targets
        _drow("fp16-flash", 16, 1, 10.0, 2000.0, context=4096),
        _drow("spectralkv", 2.5, 1, 100.0, 100.0, context=4096),
    ]


def test_decode_speedup_column(decode: ModuleType) -> None:
    rows = decode_rows()
    decode.add_derived(rows, 3000.0)
    by = {(r["method"], r["bits"], r["batch"], r["context"]): r for r in rows}
    assert by[("spectralkv", 2.5, 1, 32768)]["speedup_vs_flash"] == pytest.approx(5.0)
    assert by[("spectralkv", 2.5, 1, 32768)]["baseline"] == "fp16-flash"  # the faster of flash and SDPA
    assert by[("spectralkv", 4, 1, 32768)]["speedup_vs_flash"] == pytest.approx(2.0)
    assert by[("dequant-sdpa", 2.5, 1, 32768)]["speedup_vs_flash"] == pytest.approx(0.25)
    assert by[("spectralkv", 2.5, 4, 32768)]["speedup_vs_flash"] == pytest.approx(5.0)
    assert by[("spectralkv", 2.5, 4, 32768)]["baseline"] == "fp16-sdpa"
    assert by[("spectralkv", 2.5, 1, 4096)]["speedup_vs_flash"] == pytest.approx(0.1)  # same context only
    assert math.isnan(by[("spectralkv", 4, 4, 32768)]["speedup_vs_flash"])
    assert all(math.isnan(r["speedup_vs_flash"]) for r in rows if r["method"].startswith("fp16"))
    assert by[("spectralkv", 2.5, 1, 32768)]["pct_of_copy_bw"] == pytest.approx(80.0)
    assert all(r["copy_gbps"] == 3000.0 for r in rows)


def test_decode_targets(decode: ModuleType) -> None:
    rows = decode_rows()
    decode.add_derived(rows, 3000.0)
    got = {(r["target"], r["batch"], r["bits"]): (r["status"], r["value"]) for r in decode.check_targets(rows)}
    t25, t4, bw = (t.name for t in decode.TARGETS)
    assert got[(t25, 1, 2.5)] == ("PASS", pytest.approx(5.0))
    assert got[(t25, 4, 2.5)][0] == "PASS"
    assert got[(t4, 1, 4)] == ("FAIL", pytest.approx(2.0))  # needs 2.5x
    assert got[(t4, 4, 4)][0] == "FAIL"  # out of memory
    assert got[(bw, 1, 2.5)] == ("PASS", pytest.approx(80.0))
    assert got[(bw, 1, 4)] == ("FAIL", pytest.approx(50.0))
    assert got[(bw, 4, 2.5)][0] == "PASS" and got[(bw, 4, 4)][0] == "FAIL"
    assert len(got) == 2 + 2 + 4  # the 4k-context rows are not targets
    lines = decode.format_targets(decode.check_targets(rows), 32768)
    assert any(line.startswith("PASS") and "5.00x" in line and ">= 4x" in line for line in lines)
    assert any(line.startswith("FAIL") and "50.00%" in line and ">= 70%" in line for line in lines)
    # a bit width that was not run is reported, not silently passed
    only4 = [r for r in rows if r["bits"] != 2.5]
    missing = [r for r in decode.check_targets(only4) if r["target"] == t25]
    assert [r["status"] for r in missing] == ["NOT MEASURED"]


def test_decode_markdown_and_plot(decode: ModuleType, tmp_path: Path) -> None:
    rows = decode_rows()
    decode.add_derived(rows, 3000.0)
    lines = decode.format_targets(decode.check_targets(rows), 32768)
    meta = dict(gpu="NVIDIA H100 80GB HBM3", timestamp="2025-01-01T00:00:00+00:00", spectralkv="0.1.0",
                torch="2.x", triton="3.x", copy_gb=2.0, copy_gbps=3000.0, timer_setting="CUDA graph")
    md = tmp_path / "bench_decode.md"
    decode.write_markdown(rows, md, meta, "python scripts/bench_decode.py --contexts 32k", lines, 32768)
    text = md.read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "`python scripts/bench_decode.py --contexts 32k`" in text
    assert "2025-01-01" in text and "3000 GB/s" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # header + one line per row
    assert "| 1 | 32768 | spectralkv | 2.5 | 20.0 | 2400 | 80 | 5.00 |" in text
    assert sum(line.startswith("- PASS") or line.startswith("- FAIL") for line in text.splitlines()) == 8
    decode.plot(rows, tmp_path / "bench_decode.png")
    assert (tmp_path / "bench_decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_compressed_inputs(decode: ModuleType) -> None:
    """The benchmark's packed keys are position-centred by default (the kernel's K_POS variant, what RoPE-aware
    calibrations run), and its two compressed methods attend over the same keys at their positions: the
    dequantize-then-SDPA baseline equals the reference attention straight from the codes."""
    from spectralkv.kernels.ref import PackedSide, decode_attention_ref

    args = decode.parse_args(["--kv-heads", "2", "--head-dim", "64", "--group", "3", "--outlier-fraction", "0.01"])
    assert args.position_centring == "rope" and args.rope_theta == 500000.0
    kside, vside, k_fp, v_fp, nbytes = decode.compressed_inputs(2.5, 2, 50, args, "cpu")
    freqs = kside.quantizer.frequencies
    assert kside.quantizer.position_centred and torch.equal(freqs[:32], freqs[32:])
    assert kside.positions.flatten().tolist() == [args.sinks] * 2 and not vside.quantizer.position_centred
    assert nbytes > kside.codes.numel() + vside.codes.numel() and kside.outliers is not None
    q = torch.randn(2, 6, 64)
    want = decode_attention_ref(q, kside, vside, k_fp.float(), v_fp.float())
    got = decode.dequant_attention(q[:, :, None], kside, vside, k_fp.float(), v_fp.float(), args.sinks)[:, :, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    shifted = PackedSide(kside.quantizer, kside.codes, kside.scales, kside.outliers, kside.positions + 100)
    assert not torch.allclose(decode_attention_ref(q, shifted, vside, k_fp.float(), v_fp.float()), want, atol=1e-3)
    plain = decode.compressed_inputs(2.5, 2, 50, decode.parse_args(["--position-centring", "none"]), "cpu")[0]
    assert plain.positions is None and not plain.quantizer.position_centred
    with pytest.raises(SystemExit):
        decode.parse_args(["--rope-theta", "0"])


def test_decode_main_writes_reports(decode: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The whole of main() but the GPU work (cases and copy bandwidth faked): CSV with the derived columns in every
    row, Markdown with the provenance, PNG, and the target summary printed."""
    times = {"fp16-flash": 100.0, "fp16-sdpa": 120.0, "spectralkv": 20.0, "dequant-sdpa": 300.0}

    def fake_case(method: str, bits: float | None, context: int, batch: int, args: Any) -> dict[str, Any]:
        t = times[method] * (1.6 if bits == 4.0 else 1.0)
        return dict(method=method, bits=bits if bits is not None else 16, context=context, batch=batch, kv_heads=8,
                    head_dim=128, group=4, impl=f"{method}-impl", bytes=10**6, time_us=t, gbps=1e6 / (t * 1e-6) / 1e9,
                    timer="cudagraph+flush", l2_flushed=True, note="")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU 80GB")
    monkeypatch.setattr(decode, "measure_copy_bandwidth", lambda gb: (100.0, gb))
    monkeypatch.setattr(decode, "run_case", fake_case)
    argv = ["--contexts", "4k", "32k", "--batches", "1", "--bits", "2.5", "4", "--out", str(tmp_path)]
    assert decode.main(argv) == 0
    with (tmp_path / "bench_decode.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (2 + 2 * 2)  # contexts x (fp16-flash, fp16-sdpa, 2 bits x 2 compressed methods)
    assert all(r["gpu"] == "Fake GPU 80GB" and float(r["copy_gbps"]) == 100.0 for r in rows)
    skv = [r for r in rows if r["method"] == "spectralkv" and r["bits"] == "2.5" and r["context"] == "32768"]
    assert float(skv[0]["speedup_vs_flash"]) == pytest.approx(5.0) and skv[0]["baseline"] == "fp16-flash"
    assert float(skv[0]["pct_of_copy_bw"]) == pytest.approx(50.0)  # 50 GB/s of a 100 GB/s copy
    md = (tmp_path / "bench_decode.md").read_text()
    assert "Fake GPU 80GB" in md and "python scripts/bench_decode.py --contexts 4k 32k" in md
    assert (tmp_path / "bench_decode.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "PASS         speedup vs fp16 flash-decoding at 2.5 bits (ctx 32768, batch 1, 2.5 bit): 5.00x" in printed
    assert "PASS         speedup vs fp16 flash-decoding at 4 bits (ctx 32768, batch 1, 4 bit): 3.12x" in printed
    assert "FAIL         share of the measured copy bandwidth (ctx 32768, batch 1, 2.5 bit): 50.00%" in printed


# -- bench_generate: pure parts -----------------------------------------------------------------------------------
def test_find_max_batch(gen: ModuleType) -> None:
    tried: list[int] = []

    def fits_below(n: int) -> Any:
        def fits(b: int) -> bool:
            tried.append(b)
            return b <= n
        return fits

    assert gen.find_max_batch(fits_below(37), limit=1024) == (37, False)
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64] and len(tried) == 7 + 5  # doubling, then 5 bisection steps
    tried.clear()
    assert gen.find_max_batch(fits_below(10**6), limit=100) == (100, True)
    assert tried == [1, 2, 4, 8, 16, 32, 64, 100]
    assert gen.find_max_batch(fits_below(0), limit=64) == (0, False)
    assert gen.find_max_batch(fits_below(1), limit=64) == (1, False)
    assert gen.find_max_batch(fits_below(64), limit=64) == (64, True)


def _grow(method: str, tok_s: float, batch: int = 8, bits: float = 16, mode: str = "throughput") -> dict[str, Any]:
    return dict(method=method, bits=bits, batch=batch, context=32768, decode_tok_s=tok_s, mode=mode)


def test_generate_speedups_and_targets(gen: ModuleType) -> None:
    rows = [
        _grow("fp16-dynamic", 100.0), _grow("fp16-static", 150.0),
        _grow("spectralkv", 320.0, bits=2.5), _grow("spectralkv", 250.0, bits=4),
        _grow("spectralkv", 500.0, batch=16, bits=2.5),  # no fp16 at batch 16 (e.g. out of memory)
        _grow("fp16-dynamic", 50.0, batch=16, mode="max_batch"), _grow("spectralkv", 60.0, batch=16, mode="max_batch"),
    ]
    gen.add_speedups(rows)
    s25, s4, s16 = rows[2], rows[3], rows[4]
    assert s25["speedup_vs_fp16"] == pytest.approx(3.2) and s25["speedup_vs_best_fp16"] == pytest.approx(320 / 150)
    assert s25["baseline"] == "fp16-static"
    assert s4["speedup_vs_fp16"] == pytest.approx(2.5) and s4["speedup_vs_best_fp16"] == pytest.approx(250 / 150)
    assert math.isnan(s16["speedup_vs_fp16"]) and s16["baseline"] == ""  # max_batch rows are not baselines
    assert math.isnan(rows[6]["speedup_vs_fp16"]) and math.isnan(rows[0]["speedup_vs_fp16"])
    got = [(r["batch"], r["bits"], r["against"], r["status"]) for r in gen.check_targets(rows)]
    assert got == [
        (8, 2.5, "fp16-dynamic", "PASS"), (8, 2.5, "best fp16 (fp16-static)", "PASS"),
        (8, 4, "fp16-dynamic", "PASS"), (8, 4, "best fp16 (fp16-static)", "FAIL"),
        (16, 2.5, "fp16-dynamic", "NOT MEASURED"), (16, 2.5, "best fp16 (none measured)", "NOT MEASURED"),
    ]
    lines = gen.format_targets(gen.check_targets(rows))
    assert lines[3].startswith("FAIL") and "1.67x" in lines[3] and ">= 2x" in lines[3]
    assert gen.check_targets(rows[:2])[0]["status"] == "NOT MEASURED"  # no spectralkv run at all
    assert gen.is_oom(torch.OutOfMemoryError("x")) and gen.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not gen.is_oom(RuntimeError("shape mismatch")) and not gen.is_oom(ValueError("out of memory"))


@pytest.mark.parametrize("centring", ["rope", "none"])
def test_synthetic_calibration_is_a_valid_artifact(gen: ModuleType, tmp_path: Path, centring: str) -> None:
    """Saved and reloaded through the library's validator, at the requested budget, for the random model; with
    ``rope`` (the benchmark's default, as for a real RoPE calibration) its keys are position-centred."""
    from spectralkv import SpectralKVConfig

    args = gen.parse_args(["--device", "cpu", "--tiny"])
    assert args.position_centring == "rope"
    model = gen.build_model(args)
    cfg = gen.synthetic_calibration(model, 2.5, window=8, sinks=2, position_centring=centring)
    cfg.save_pretrained(tmp_path / "cal", card=False)
    loaded = SpectralKVConfig.from_pretrained(tmp_path / "cal", model=model)
    assert loaded.compressed_layers == [0, 1] and (loaded.window, loaded.sink_tokens) == (8, 2)
    assert 2.0 < loaded.effective_bits() <= 2.5
    bits = loaded.allocation()[(0, "k")]
    assert int(bits.max()) > int(bits.min())  # log-spaced spectrum: leading coordinates get more bits
    quant = loaded.quantizers()
    assert quant[(0, "k")].position_centred == (centring == "rope") and not quant[(0, "v")].position_centred
    with pytest.raises(ValueError, match="'rope' or 'none'"):
        gen.synthetic_calibration(model, 2.5, window=8, sinks=2, position_centring="RoPE")


def test_generate_outlier_fraction(gen: ModuleType) -> None:
    """``--outlier-fraction`` gives the synthetic calibration exact outliers (Gaussian threshold, a calibration's
    cap), and both spectralkv caches then store them through the benchmark's own paths."""
    from spectralkv.fused import enable_fused
    from spectralkv.static import StaticSpectralKVCache, default_outlier_slots

    with pytest.raises(SystemExit):
        gen.parse_args(["--device", "cpu", "--tiny", "--outlier-fraction", "1.5"])
    args = gen.parse_args(["--device", "cpu", "--tiny", "--outlier-fraction", "0.01"])
    runner = gen.Runner(gen.build_model(args), args)
    cfg = runner.calibration(2.5)
    assert cfg.outlier_threshold == pytest.approx(2.5758, abs=1e-3) and cfg.outlier_fraction == 0.01
    assert gen.synthetic_calibration(runner.model, 2.5, 8, 2).outlier_threshold is None  # the default: none
    grown = gen.filled_cache(runner.model, "spectralkv", 2, 40, 48, cfg, args)
    assert grown.layers[0].key_store.outliers.entries > 0
    row = runner.run("spectralkv", 2.5, 2, 4)
    assert row["decode_tok_s"] > 0
    previous = enable_fused(runner.model)
    try:
        static = StaticSpectralKVCache(runner.model, cfg, max_cache_len=args.context + 4, window=args.window,
                                       sink_tokens=args.sinks)
        row = gen.generate_once(runner.model, "spectralkv-static", 2, args.context, 4, args, cache=static,
                                filled=False)
    finally:
        runner.model.set_attn_implementation(previous)
    layer = static.layers[0]
    assert layer.slots == (default_outlier_slots(cfg),) * 2 and int(layer.out_counts[0].sum()) > 0
    assert row["cache_bytes"] == static.memory_report()["resident_bytes"] > static.memory_report()["outliers_bytes"]


def test_model_is_created_on_the_target_device(gen: ModuleType) -> None:
    """Weights are allocated where the model runs (meta here, cuda on a GPU): no 16 GB host copy for the 8B shape."""
    args = gen.parse_args([])  # the full 8B shape
    args.device = "meta"
    model = gen.build_model(args)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == 7_241_732_096  # Llama-3.1-8B with a 32000-token vocab
    assert model.config.num_key_value_heads == 8 and model.config.head_dim == 128
    assert next(model.parameters()).dtype == torch.float16 and model.config._attn_implementation == "sdpa"


# -- bench_generate end to end on CPU --------------------------------------------------------------------------------
def test_generate_tiny_cpu_end_to_end(gen: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spectralkv import fused

    attends: list[int] = []
    original = fused.DecodeSnapshot.attend

    def attend(self: Any, *a: Any, **k: Any) -> torch.Tensor:
        attends.append(self.n_compressed)
        return original(self, *a, **k)

    monkeypatch.setattr(fused.DecodeSnapshot, "attend", attend)
    out = tmp_path / "res"
    threads = torch.get_num_threads()
    assert gen.main(["--device", "cpu", "--tiny", "--bits", "2.5", "--flush-blocks", "1", "4", "--find-max-batch",
                     "--max-batch-limit", "2", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # restored
    with (out / "bench_generate.csv").open() as f:
        rows = list(csv.DictReader(f))
    flushed = [r for r in rows if r["mode"] == "throughput" and r["flush_block"] == "4"]
    assert [r["method"] for r in flushed] == ["spectralkv"] and float(flushed[0]["decode_tok_s"]) > 0
    thr = {r["method"]: r for r in rows if r["mode"] == "throughput" and r["flush_block"] == "1"}
    assert set(thr) == {"fp16-dynamic", "fp16-static", "spectralkv", "spectralkv-static"}
    for r in thr.values():
        assert int(r["batch"]) == 2 and int(r["context"]) == 64 and int(r["new_tokens"]) == 8
        assert float(r["decode_tok_s"]) > 0 and float(r["prefill_s"]) > 0 and float(r["decode_s"]) > 0
        assert float(r["prefill_tok_s"]) > 0 and int(r["cache_bytes"]) > 0
    skv, fp = thr["spectralkv"], thr["fp16-dynamic"]
    assert skv["cache_type"] == "FusedSpectralKVCache" and skv["attn_implementation"] == "spectralkv_fused"
    assert skv["fused_backend"] == "torch reference" and fp["attn_implementation"] == "sdpa"  # CPU: no Triton
    assert int(skv["compressed_tokens"]) > 40  # 64 + 7 tokens, 8 window, 2 sinks
    assert int(skv["cache_bytes"]) < 0.5 * int(fp["cache_bytes"])  # really compressed
    assert fp["cache_type"] == "DynamicCache" and thr["fp16-static"]["cache_type"] == "StaticCache"
    assert attends and max(attends) > 40  # the fused decode path ran, over the compressed tokens
    assert float(skv["speedup_vs_fp16"]) == pytest.approx(float(skv["decode_tok_s"]) / float(fp["decode_tok_s"]))
    static = thr["spectralkv-static"]
    assert static["cache_type"] == "StaticSpectralKVCache" and static["fused_backend"] == "torch reference"
    assert int(static["compressed_tokens"]) == 64 + 7 - 9 - 2 and "eager decode steps" in static["note"]
    assert int(static["cache_bytes"]) < 0.5 * int(fp["cache_bytes"])
    maxb = {r["method"]: r for r in rows if r["mode"] == "max_batch"}
    assert set(maxb) == set(thr) - {"spectralkv-static"}  # it preallocates what spectralkv holds
    assert all(int(r["max_batch"]) == 2 and "limit" in r["note"] for r in maxb.values())
    assert all(r["gpu"] == "cpu" and r["dtype"] == "float32" for r in rows)
    md = (out / "bench_generate.md").read_text()
    assert "python scripts/bench_generate.py --device cpu --tiny" in md and "largest batch that fits" in md
    assert "| spectralkv 2.5 bit | 2 | 64 | 8 |" in md and "decode speedup vs fp16-dynamic" in md
    assert "| spectralkv 2.5 bit, flush 4 | 2 | 64 | 8 |" in md and "2.5 bit, flush 4)" in md
    assert (out / "bench_generate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_filled_cache_holds_what_a_prefill_leaves(gen: ModuleType) -> None:
    """The batch search's synthetic fill leaves the same cache (type, resident bytes, compressed tokens) as a real
    prefill, and generate decodes from it after one step over the extra prompt token."""
    args = gen.parse_args(["--device", "cpu", "--tiny"])
    runner = gen.Runner(gen.build_model(args), args)
    for method, bits in (("fp16-dynamic", None), ("fp16-static", None), ("spectralkv", 2.5)):
        real = runner.run(method, bits, 3, 5)
        filled = runner.run(method, bits, 3, 5, fill=True)
        for key in ("cache_type", "cache_bytes", "compressed_tokens", "new_tokens", "context", "fused_backend"):
            assert filled[key] == real[key], (method, key, filled[key], real[key])
        assert filled["cache_bytes"] > 0 and "no prefill" in filled["note"] and math.isnan(filled["prefill_tok_s"])
    assert real["compressed_tokens"] > 40  # spectralkv really compressed the filled tokens


# -- scripts/gpu_check.sh: the one prepared run for a lent GPU ----------------------------------------------------
def _gpu_check(tmp_path: Path, *stages: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **env}
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), *stages], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_gpu_check_rejects_unknown_stages(tmp_path: Path) -> None:
    out = _gpu_check(tmp_path, "tests", "benchmarks")
    assert out.returncode == 2 and "unknown stage 'benchmarks'" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's refusal on a machine without CUDA")
def test_gpu_check_without_gpu(tmp_path: Path) -> None:
    """Without CUDA it refuses up front; with the plumbing switch it runs a stage on the package copied from this
    checkout (kernels/ inside spectralkv/), records each stage's exit status and cleans up its temporary site."""
    out = _gpu_check(tmp_path, "decode")
    assert out.returncode == 3 and "needs a CUDA GPU" in out.stdout + out.stderr
    out = _gpu_check(tmp_path, "decode", GPU_CHECK_ALLOW_CPU="1")
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert out.returncode == 1, log  # the benchmark itself exits 2 without a GPU, so the run is not a success
    site = next(line for line in log.splitlines() if line.startswith("spectralkv ")).split(" from ")[1]
    assert site.startswith("/tmp/spectralkv-site.") and site.endswith("/spectralkv/__init__.py")
    assert not Path(site).exists()  # the temporary site is removed
    assert "== decode: exit 2" in log and "stages: decode=2" in log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.log"]


def test_count_dispatches_counts_launches_and_custom_ops_once(capsys: pytest.CaptureFixture[str]) -> None:
    """The host-work counter behind docs/experiments.md: views are not launches; the script prints one row per cache,
    and the fused cache costs more launches than ``DynamicCache`` (the custom ops' own internals are not counted)."""
    counting = _load("count_dispatches")
    x = torch.randn(4, 4)
    counter = counting.Counter()
    with counter:
        torch.cat([x, x]).view(-1)
        x.t()
    assert (counter.total, counter.launching) == (3, 1)
    assert counting.main(["--steps", "3", "--backend", "torch"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 4 and all(float(r.split("|")[-2]) > 0 for r in rows[2:]), rows


# -- scripts/eval_outlier_slots.py ----------------------------------------------------------------------------------
def test_outlier_slots_accounting_and_capped_caches(tiny_llama: Any) -> None:
    """The script's static-layout bits per coordinate are what StaticSpectralKVCache allocates per code row, and its
    capped growing caches keep at most that many outliers per token (with the calibration's entries otherwise)."""
    from conftest import tiny_calibrate

    from spectralkv.fused import enable_fused
    from spectralkv.static import StaticSpectralKVCache

    script = _load("eval_outlier_slots")
    with pytest.raises(SystemExit):
        script.parse_args(["--calibration", "x", "--slots", "0"])
    cfg = tiny_calibrate(tiny_llama, bits=4.0, outlier_thresholds=(2.0,))
    assert cfg.outlier_cap is not None and cfg.outlier_cap > 2
    ids = torch.randint(2, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    previous = enable_fused(tiny_llama)
    try:
        for slots in (cfg.outlier_cap, 2):
            cache = StaticSpectralKVCache(tiny_llama, cfg, max_cache_len=41, outlier_slots=slots, backend="torch")
            tiny_llama(input_ids=ids, cache=cache, use_cache=True)
            layers = [layer for layer in cache.layers if hasattr(layer, "slots")]
            report = cache.memory_report()
            row_bits = 8 * (report["codes_bytes"] + report["metadata_bytes"] + report["outliers_bytes"])
            rows = 2 * (layers[0].rows + 1) * len(layers)  # batch x code rows, per layer
            per_coord = row_bits / (rows * 2 * cfg.num_kv_heads * cfg.head_dim)
            assert script.static_bits_per_coordinate(cfg, cfg.bits, slots) == pytest.approx(per_coord)
    finally:
        tiny_llama.set_attn_implementation(previous)
    plain = script.static_bits_per_coordinate(cfg.without_outliers(), cfg.bits, 0)
    assert plain < script.static_bits_per_coordinate(cfg, cfg.bits, 2)
    for cap in (None, 1):
        cache = script.capped_factory(tiny_llama, cfg, cfg.bits, cap)()
        tiny_llama(input_ids=ids, cache=cache, use_cache=True)
        counts = cache.layers[0].key_store.inner.outliers.view().counts
        assert int(counts.max()) == (cfg.outlier_cap if cap is None else 1)



def test_outlier_slots_report(tmp_path: Path) -> None:
    script = _load("eval_outlier_slots")
    rows = [{"label": f"3 bit, {n}", "bits": 3.0, "slots": n, "dppl_pct": d, "ci95_pct": [d - 0.5, d + 0.5],
             "measured_bits": None if n == 0 else 2.9, "static_bits": 3 + n / 10, "ppl": 11.7, "seconds": 1.0}
            for n, d in ((0, 3.4), (1, 1.9), (5, 1.2))]
    meta = {"calibration": "cal", "outlier_threshold": 3.0, "outlier_fraction": 0.0057, "cap": 5,
            "settings": {"windows": 24, "prefill": 512, "decode": 192}, "fp16_ppl": 11.546, "argv": ["--bits", "3"]}
    md = script.markdown(rows, meta)
    assert "| 3 bit, 1 | +1.90 | [+1.40, +2.40] | 2.900 | 3.100 |" in md and "cap 5 per token" in md
    assert "| 3 bit, 0 | +3.40 | [+2.90, +3.90] | - | 3.000 |" in md
    script.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- scripts/eval_weight_profiles.py --------------------------------------------------------------------------------
def test_weight_profiles_script_end_to_end(tiny_llama: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the tiny model: each budget a profile serves runs as served and with one set of weights, the paired
    difference is reported, and budgets the default's weights serve are left out (none at all: exit 2)."""
    import json

    from conftest import ByteTokenizer, tiny_calibrate

    from spectralkv import models

    script = _load("eval_weight_profiles")
    for bad in (["--windows", "0"], ["--batch-size", "-1"]):
        with pytest.raises(SystemExit) as e:
            script.parse_args(["--calibration", "x", *bad])
        assert e.value.code == 2, bad
    assert script.parse_args(["--calibration", "x"]).settings.windows == 24  # the harness's default
    cfg = tiny_calibrate(tiny_llama, profile_budgets=())
    cfg = cfg.with_weight_profiles([{"bits": 2.0, "factors": [[50.0, 1.0] for _ in cfg.compressed_layers]}])
    folder = cfg.save_pretrained(tmp_path / "cal")
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: (tiny_llama, ByteTokenizer(256)))
    common = ["--calibration", str(folder), "--windows", "2", "--prefill", "48", "--decode", "8", "--batch-size", "2",
              "--no-progress"]
    assert script.main([*common, "--bits", "3", "4", "--out", str(tmp_path / "none")]) == 2
    assert script.main([*common, "--bits", "2", "3", "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "weight_profiles.json").read_text())
    (row,) = data["rows"]
    assert (row["bits"], row["profile_bits"]) == (2.0, 2.0)
    assert row["profile"]["key_bits"] > row["default_weights"]["key_bits"]  # the factors moved bits to keys
    assert row["profile"]["dppl_pct"] != row["default_weights"]["dppl_pct"]
    md = (tmp_path / "out" / "weight_profiles.md").read_text()
    assert "| 2 (profile 2) |" in md and "profiles kept at 2)" in md


# -- scripts/compare_calibrations.py --------------------------------------------------------------------------------
def test_compare_calibrations_end_to_end(tiny_llama: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the tiny model: two calibrations (fp16 vs log8 scales, both forced on) paired on the same windows; the
    paired difference is the difference of their NLLs, and a budget one cannot serve is left out."""
    import dataclasses
    import json

    from conftest import ByteTokenizer, tiny_calibrate

    from spectralkv import models

    script = _load("compare_calibrations")
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--baseline", "a", "--candidate", "b", "--windows", "0"])
    assert e.value.code == 2
    folders = []
    for fmt in ("fp16", "log8"):
        cfg = tiny_calibrate(tiny_llama, outlier_thresholds=(None,), profile_budgets=(), scale_format=fmt)
        alloc = dataclasses.replace(cfg, token_scale=True, bits=2.5).allocation()  # one that pays for the scales
        cfg = dataclasses.replace(cfg, token_scale=True, default_bits=2.5, bits=None, tensors=dict(cfg.tensors))
        for (layer, kind), bits in alloc.items():
            cfg.tensors[f"layers.{layer}.{kind}.bits"] = bits
        folders.append(cfg.save_pretrained(tmp_path / fmt))
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: (tiny_llama, ByteTokenizer(256)))
    out = tmp_path / "out"
    argv = ["--baseline", str(folders[0]), "--candidate", str(folders[1]), "--labels", "fp16", "log8",
            "--bits", "0.75", "2", "3", "--windows", "2", "--prefill", "48", "--decode", "8", "--batch-size", "2",
            "--no-progress", "--out", str(out)]
    assert script.main(argv) == 0
    data = json.loads((out / "compare.json").read_text())
    assert [r["bits"] for r in data["rows"]] == [2.0, 3.0]  # 0.75 bits cannot pay for fp16 scales (1 bit)
    for r in data["rows"]:
        assert r["log8"]["bits_per_coordinate"] <= r["bits"] and r["fp16"]["bits_per_coordinate"] <= r["bits"]
        code = {label: r[label]["key_bits"] + r[label]["value_bits"] for label in ("fp16", "log8")}
        assert code["log8"] > code["fp16"]  # the byte the scale saves goes to the codes
        assert r["paired_ci95_pct"][0] <= r["paired_pct"] <= r["paired_ci95_pct"][1]
    assert data["meta"]["choices"]["log8"]["scale"] == "log8"
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "compare.md").read_text()
    assert "### log8 vs fp16" in md and "| 2 |" in md and "| log8 | log8 |" in md


# -- scripts/eval_position_centring.py ------------------------------------------------------------------------------
def test_position_centring_script_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a tiny Llama whose keys carry a pre-RoPE mean: both calibrations are measured per position range, the
    RoPE-centred one has the lower key error beyond its 128-token calibration sequences, and the table and plot are
    written."""
    import json

    from conftest import ByteTokenizer, make_tiny, tiny_calibrate

    from spectralkv import models

    script = _load("eval_position_centring")
    assert script.parse_ranges("4-128,384-512") == [(4, 128), (384, 512)]
    for bad in (["--ranges", "5"], ["--ranges", "9-3"], ["--length", "3"], ["--length", "100", "--ranges", "4-200"]):
        with pytest.raises(SystemExit) as e:
            script.parse_args(["--calibrations", "x", *bad])
        assert e.value.code == 2, bad
    model = make_tiny("llama", seed=1, attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.normal_(0, 2, generator=torch.Generator().manual_seed(2))
    folders = []
    for name, centring in (("plain", None), ("rope", "rope")):
        cfg = tiny_calibrate(model, profile_budgets=(), position_centring=centring)
        folders.append(str(cfg.save_pretrained(tmp_path / name)))
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: (model, ByteTokenizer(256)))
    out = tmp_path / "out"
    assert script.main(["--calibrations", *folders, "--bits", "2", "--length", "512", "--ranges", "4-128,384-512",
                        "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "position_centring.json").read_text())
    rows = {r["calibration"]: r for r in data["rows"]}
    assert rows["rope"]["position_centring"] == "rope" and rows["plain"]["position_centring"] is None
    assert rows["rope"]["k_384-512"] < rows["plain"]["k_384-512"]
    assert rows["rope"]["v_4-128"] > 0 and len(data["curves"]["rope @ 2"]) == (512 - 4) // 128
    md = (out / "position_centring.md").read_text()
    assert "| rope | rope | 2 |" in md and "| plain | mean | 2 |" in md
    assert (out / "position_centring.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_decode_tiny_end_to_end(tmp_path: Path) -> None:
    """The CPU benchmark runs every method on every case and writes its table, JSON and plot; the compressed caches
    really hold compressed tokens (the contexts exceed sinks + window)."""
    cpu = _load("bench_cpu_decode")
    assert cpu.main(["--tiny", "--contexts", "48", "80", "--batches", "2", "--steps", "2", "--out",
                     str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["rows"]
    assert [(r["method"], r["context"]) for r in rows] == [(m, c) for c in (48, 80) for m in cpu.METHODS]
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert all(r["vs_uncompressed"] == 1.0 for r in rows if r["method"] == "uncompressed")
    md = (tmp_path / "results.md").read_text()
    assert md.count("| spectralkv-fused |") == 2 and (tmp_path / "cpu_decode.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        cpu.parse_args(["--steps", "0"])


def test_cpu_decode_fill_compresses_what_a_prefill_would(tiny_llama: Any, tiny_llama_calibration: Any) -> None:
    """Handing a prefill's keys and values to a spectralkv cache (``fill``) stores them as its own prefill does."""
    from transformers import DynamicCache

    from spectralkv import SpectralKVCache

    cpu = _load("bench_cpu_decode")
    cfg = tiny_llama_calibration
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = DynamicCache(config=tiny_llama.config)
        tiny_llama(ids, cache=plain, use_cache=True)
        own, filled = SpectralKVCache(tiny_llama, cfg), SpectralKVCache(tiny_llama, cfg)
        tiny_llama(ids, cache=own, use_cache=True)
        cpu.fill(filled, [(layer.keys, layer.values) for layer in plain.layers])
        nxt = ids[:, -1:]
        a = tiny_llama(nxt, cache=own, use_cache=True).logits
        b = tiny_llama(nxt, cache=filled, use_cache=True).logits
    assert filled.get_seq_length() == own.get_seq_length() == 61
    assert filled.memory_report()["compressed_tokens"] > 0
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
