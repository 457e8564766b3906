"""The demo Space (spaces/spectralkv-demo/app.py): handlers called directly, the app driven through gradio_client,
and one end-to-end click in headless Chromium.

All tests share the session's SmolLM2 (conftest ``smollm2``) and one tiny bundled calibration made on first use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

gr = pytest.importorskip("gradio", reason="the Space needs gradio: pip install -e '.[space]'")

pytestmark = pytest.mark.slow

APP_PATH = Path(__file__).resolve().parent.parent / "spaces" / "spectralkv-demo" / "app.py"
PROMPT = "Name three colours."
MAX_NEW = 6
WINDOW = 4  # small, so most of the prompt is really compressed
TINY_BUNDLED = {  # the bundled calibration, shrunk for tests
    "SPECTRALKV_SPACE_CALIBRATION_TOKENS": "256",
    "SPECTRALKV_SPACE_HELDOUT_TOKENS": "256",
    "SPECTRALKV_SPACE_SEQ_LEN": "256",
}


def _load_app() -> ModuleType:
    spec = importlib.util.spec_from_file_location("spectralkv_space_app", APP_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app(smollm2: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRALKV_SPACE_CACHE", str(tmp_path_factory.mktemp("space-cache")))
        for k, v in TINY_BUNDLED.items():
            mp.setenv(k, v)
        mp.delenv("SPECTRALKV_SPACE_RESULTS", raising=False)
        module = _load_app()
        module.set_model(*smollm2)
        yield module
    sys.modules.pop("spectralkv_space_app", None)


def _session_calibrates_smollm2(request: pytest.FixtureRequest) -> bool:
    """Whether another test module of this session uses conftest's (4k-token) ``smollm2_calibration``."""
    return any("smollm2_calibration" in getattr(item, "fixturenames", ()) and item.module is not request.module
               for item in request.session.items)


@pytest.fixture(scope="module")
def bundled_dir(app: ModuleType, request: pytest.FixtureRequest) -> Path:
    """The bundled calibration, made on first use into the cache folder; also usable as a local-folder source.

    Run alone, this file really calibrates (tiny sizes from ``TINY_BUNDLED``). In a full run, where conftest's
    ``smollm2_calibration`` is computed anyway, the calibrator call is answered with it to save the time.
    """
    import spectralkv.calibrate

    calls: list[dict[str, Any]] = []
    with pytest.MonkeyPatch.context() as mp:
        if _session_calibrates_smollm2(request):
            shared = request.getfixturevalue("smollm2_calibration")

            def fake_calibrate(model: Any, tok: Any, **kwargs: Any) -> Any:
                calls.append(kwargs)
                return shared

            mp.setattr(spectralkv.calibrate, "calibrate", fake_calibrate)
        cfg = app.get_calibration("bundled")
    folder = app.bundled_calibration_dir()
    assert (folder / "spectralkv_config.json").is_file()
    if calls:
        assert calls == [{"bits": 3.0, "progress": False, "tokens": 256, "heldout_tokens": 256, "seq_len": 256}]
    assert app.get_calibration("") is cfg  # reused, not recalibrated
    app._calibrations.clear()  # a restarted Space: loads the cached folder instead of calibrating again

    def no_calibrate(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cached bundled calibration should have been reused")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spectralkv.calibrate, "calibrate", no_calibrate)
        assert app.get_calibration("bundled").fingerprint == cfg.fingerprint
    return folder


def _error_message(exc_info: pytest.ExceptionInfo[Any]) -> str:
    msg = str(exc_info.value.message)
    assert "Traceback" not in msg
    return msg


def test_space_card_and_requirements() -> None:
    """The README's YAML is a valid Space card pinned to the installed gradio, and requirements.txt agrees."""
    from importlib.metadata import version

    from huggingface_hub import RepoCard

    data = RepoCard.load(APP_PATH.parent / "README.md", repo_type="space").data
    assert data.sdk == "gradio" and data.app_file == "app.py" and data.sdk_version == version("gradio")
    assert data.models == ["HuggingFaceTB/SmolLM2-135M-Instruct"] and data.license and data.python_version
    requirements = (APP_PATH.parent / "requirements.txt").read_text()
    assert f"gradio=={version('gradio')}" in requirements and "spectralkv" in requirements


# -- (a) handlers called directly -----------------------------------------------------------------------------------
def test_generate_side_by_side_streams_both_outputs_and_memory(app: ModuleType, bundled_dir: Path) -> None:
    updates = list(app.generate_side_by_side(app.long_prompt(), "bundled", 3.0, WINDOW, MAX_NEW))
    assert len(updates) >= 4, "expected streamed partial updates before the final one"
    assert any(u[0] and not u[1] for u in updates), "the full-precision text should stream before spectralkv's"
    fp_text, skv_text, status, numbers = updates[-1]
    assert fp_text.strip() and skv_text.strip()
    fp, skv = numbers["fp"], numbers["spectralkv"]
    assert fp["new_tokens"] == skv["new_tokens"] == MAX_NEW
    assert fp["tokens_per_s"] > 0 and skv["tokens_per_s"] > 0
    assert skv["context_tokens"] == fp["context_tokens"] > 400 and skv["compressed_tokens"] > 300
    assert 0 < skv["resident_bytes"] < skv["fp16_bytes"] <= fp["resident_bytes"]
    assert 0.3 < numbers["saved_fraction"] < 1
    assert numbers["bits"] == 3.0 and numbers["window"] == WINDOW
    assert f"saves {100 * numbers['saved_fraction']:.1f}%" in status
    assert "tokens/s" in status and "KiB" in status


def test_generate_from_local_folder_at_another_budget(app: ModuleType, bundled_dir: Path) -> None:
    fp_text, skv_text, _, numbers = app.run_side_by_side(PROMPT, str(bundled_dir), 2.0, WINDOW, MAX_NEW)
    assert fp_text.strip() and skv_text.strip()
    assert numbers["bits"] == 2.0 and numbers["effective_bits"] <= 2.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(calibration="no-such-org/no-such-calibration"), "Could not load calibration 'no-such-org/no-such"),
        (dict(bits=9.0), r"Bit budget out of range: .*\(0, 8\]"),
        (dict(bits=0), r"Bit budget out of range: .*\(0, 8\]"),
        (dict(bits=-1), r"Bit budget out of range"),
        (dict(window=-3), "window must be a whole number"),
        (dict(max_new_tokens=0), "Max new tokens"),
        (dict(prompt="   "), "Type a prompt"),
    ],
)
def test_generate_errors_are_clear_messages(app: ModuleType, bundled_dir: Path, kwargs: dict, match: str) -> None:
    args = {**dict(prompt=PROMPT, calibration="bundled", bits=3.0, window=WINDOW, max_new_tokens=MAX_NEW), **kwargs}
    with pytest.raises(gr.Error) as exc_info:
        next(iter(app.generate_side_by_side(**args)))
    assert exc_info.match(match), _error_message(exc_info)
    _error_message(exc_info)


def test_calibration_errors_name_the_problem(app: ModuleType, tmp_path: Path, tiny_llama_calibration: Any) -> None:
    with pytest.raises(gr.Error) as exc_info:
        app.get_calibration(str(tmp_path))
    assert "is not a spectralkv calibration" in _error_message(exc_info)

    other = tiny_llama_calibration.save_pretrained(tmp_path / "tiny-llama-skv")
    with pytest.raises(gr.Error) as exc_info:
        app.inspect_calibration(str(other), 3.0)
    msg = _error_message(exc_info)
    assert "is for another model" in msg and "tiny-random-llama" in msg


def test_inspect_shows_spectra_allocation_and_split(app: ModuleType, bundled_dir: Path) -> None:
    png, summary, table, figure = app.inspect_calibration("bundled", 2.5)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2.5 bits/coord" in summary and "keys" in summary and "values" in summary
    cfg = app.get_calibration("bundled")
    assert f"those fitted at **{cfg.profile_bits(2.5):g} bits**" in summary
    assert len(table) == len(cfg.compressed_layers)
    assert {"K bits", "V bits", "K participation ratio"} <= set(table.columns)
    assert figure is not None
    with pytest.raises(gr.Error, match="Bit budget out of range"):
        app.inspect_calibration("bundled", 12)
    if cfg.min_bits > 0:  # per-token scales chosen: budgets below their cost are refused by name
        with pytest.raises(gr.Error, match=r"Bit budget out of range: .*too small"):
            app.inspect_calibration("bundled", cfg.min_bits / 2)


def test_quality_tab_reads_results_or_says_none(app: ModuleType, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(app, "results_dirs", lambda: [empty])
    text, image = app.load_results()
    assert "No evaluation results found" in text and image is None

    (empty / "results.json").write_text(json.dumps({"rows": [{"method": "spectralkv", "bits": 3.0, "dppl": 0.016},
                                                             {"method": "kivi", "bits": 3.0, "dppl": 0.121}]}))
    Image.new("RGB", (40, 30), "white").save(empty / "pareto.png")
    text, image = app.load_results()
    assert "| method | bits | dppl |" in text and "| kivi | 3 | 0.121 |" in text
    assert image is not None and image.size == (40, 30)

    (empty / "results.md").write_text("| method | dPPL |\n|---|---|\n| spectralkv | +1.6% |\n")
    assert "| spectralkv | +1.6% |" in app.load_results()[0]


def test_quality_tab_shows_the_committed_results(app: ModuleType) -> None:
    """Out of the box the Space shows the README's results (docs/results): the table and the Pareto plot."""
    text, image = app.load_results()
    assert "docs/results" in text and "| spectralkv | 2.5 |" in text and "| kivi |" in text
    assert image is not None



def test_quick_evaluation_button(app: ModuleType, bundled_dir: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The button's wiring (the harness itself is tested elsewhere; its quick mode takes minutes on CPU)."""
    from PIL import Image

    out = tmp_path / "results"
    monkeypatch.setenv("SPECTRALKV_SPACE_RESULTS", str(out))
    monkeypatch.setattr(app, "results_dirs", lambda: [out])  # not the repo's committed docs/results
    monkeypatch.setitem(sys.modules, "spectralkv.evaluation", None)  # importing it now raises ImportError
    status, text, image = app.run_quick_evaluation("bundled")
    assert "evaluation harness is not available" in status and "No evaluation results found" in text
    monkeypatch.delitem(sys.modules, "spectralkv.evaluation")

    evaluation = pytest.importorskip("spectralkv.evaluation")
    seen: dict[str, Any] = {}

    def fake_run(model: Any, tok: Any, **kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs)
        return {"runs": []}

    def fake_write(results: dict[str, Any], out_dir: Path, *, plot: bool = True) -> dict[str, Path]:
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "results.md").write_text("| method | dPPL |\n|---|---|\n| spectralkv | +1.0% |\n")
        Image.new("RGB", (20, 10)).save(Path(out_dir) / "pareto.png")
        return {}

    monkeypatch.setattr(evaluation, "run_evaluation", fake_run)
    monkeypatch.setattr(evaluation, "write_outputs", fake_write)
    status, text, image = app.run_quick_evaluation("bundled")
    assert "Quick evaluation finished" in status and "| spectralkv | +1.0% |" in text and image.size == (20, 10)
    assert seen["calibration"] is app.get_calibration("bundled")
    assert seen["settings"] == evaluation.EvalSettings.quick()


# -- (b) the launched app through gradio_client ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(app: ModuleType, bundled_dir: Path) -> Iterator[str]:
    demo = app.demo
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True,
                            quiet=True, ssr_mode=False, **app.launch_kwargs())
    try:
        yield url.rstrip("/")
    finally:
        demo.close()


def test_client_generate_and_error(server: str, bundled_dir: Path) -> None:
    from gradio_client import Client

    client = Client(server, verbose=False)
    fp_text, skv_text, status, numbers = client.predict(PROMPT, str(bundled_dir), 2.5, WINDOW, MAX_NEW,
                                                        api_name="/generate")
    assert fp_text.strip() and skv_text.strip()
    assert "KiB" in status and numbers["spectralkv"]["resident_bytes"] > 0 and numbers["bits"] == 2.5
    with pytest.raises(Exception, match=r"Could not load calibration 'no-such-org/nothing'") as exc_info:
        client.predict(PROMPT, "no-such-org/nothing", 3.0, WINDOW, MAX_NEW, api_name="/generate")
    assert "Traceback" not in str(exc_info.value)
    with pytest.raises(Exception, match=r"greater than maximum value 8"):  # the slider's own range check
        client.predict(PROMPT, "bundled", 9.0, WINDOW, MAX_NEW, api_name="/generate")
    text, _ = client.predict(api_name="/results")
    assert "results" in text.lower()


# -- (c) end to end in headless Chromium ----------------------------------------------------------------------------
CHROMIUM = os.environ.get("SPECTRALKV_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SPECTRALKV_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).is_file() or not Path(CHROMEDRIVER).is_file():
        return (f"headless Chromium not installed ({CHROMIUM} / {CHROMEDRIVER} missing): "
                "run `bash scripts/install_browser.sh`")
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed: pip install -e '.[space]'"
    return None


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_browser_click_generate_shows_both_outputs(server: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    shots = tmp_path_factory.mktemp("space-screenshots")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 f"--user-data-dir={shots / 'profile'}", "--window-size=1400,1500"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 60)
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#generate-btn")))

        def set_number(elem_id: str, value: int) -> None:  # the number box beside a slider, as a user would type
            box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
            box.clear()
            box.send_keys(str(value))
            box.send_keys("\t")

        set_number("max-new-tokens", MAX_NEW)
        set_number("window", WINDOW)
        prompt = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
        prompt.clear()
        prompt.send_keys(PROMPT)
        driver.find_element(By.CSS_SELECTOR, "#generate-btn").click()

        def done(d: Any) -> bool:
            fp = d.find_element(By.CSS_SELECTOR, "#fp-output textarea").get_attribute("value")
            skv = d.find_element(By.CSS_SELECTOR, "#skv-output textarea").get_attribute("value")
            return bool(fp.strip() and skv.strip() and "fp16 cache" in d.find_element(By.ID, "stats").text)

        t0 = time.perf_counter()
        WebDriverWait(driver, 240, poll_frequency=0.5).until(done)
        shot = shots / "space-generate.png"
        driver.save_screenshot(str(shot))
        print(f"\nscreenshot: {shot} (generation took {time.perf_counter() - t0:.1f} s in the browser)")
        assert shot.stat().st_size > 10_000
        assert "Traceback" not in driver.page_source
    finally:
        driver.quit()
