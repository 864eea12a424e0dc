"""The demo page end to end in a real browser: headless Chromium with its fake camera, driven by Playwright.

Playwright drives the system's Chromium (`executable_path`); its own browser downloads are not used.
The test's screenshot is written to out/test-artifacts/ (or $FASTDIFF_TEST_ARTIFACTS).
"""

import os
import shutil
import warnings
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the demo extra (fastapi, uvicorn, websockets) is not installed")

from fastdiff.demo import DemoConfig, create_app, serve_in_thread  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("FASTDIFF_TEST_ARTIFACTS", REPO / "out" / "test-artifacts"))
# Every wait is for an event (outputs arrived, a readout changed), polled on a timer rather than on
# animation frames (which a headless, busy machine throttles); the limit is a guard against a page that
# never produces, wide enough for a 2-core machine shared with another job, not a speed requirement.
WAIT_MS = 600_000
POLL_MS = 250
FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


def find_chromium() -> str | None:
    return os.environ.get("FASTDIFF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def skip_loudly(reason: str):
    # A skip reason only shows with -rs; a warning shows in every run's summary.
    warnings.warn(f"BROWSER TEST SKIPPED: {reason}", pytest.PytestWarning)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server():
    import torch

    from fastdiff.shapes.model import load_pipeline

    torch.set_num_threads(1)
    config = DemoConfig(max_sessions=2, threads=1)
    with serve_in_thread(create_app(load_pipeline(), config), config) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    if chromium is None:
        skip_loudly("no Chromium found (the test command installs Debian's `chromium` with apt; "
                    "that failed or was not possible here). Set FASTDIFF_CHROMIUM to a Chromium binary.")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_loudly("playwright is not installed: pip install -e \".[test]\"")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=FAKE_CAMERA)
        yield browser
        browser.close()


def number(page, element_id: str) -> float:
    return float(page.text_content(f"#{element_id}"))


def test_webcam_shapes_and_txt2img_in_the_page(browser, server):  # browser first: it may skip
    page = browser.new_page(viewport={"width": 1000, "height": 720})
    problems = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: message.type == "error" and problems.append(f"console: {message.text}"))
    page.goto(server + "/")
    page.set_default_timeout(WAIT_MS)
    page.wait_for_selector("#toggle:not([disabled])", timeout=WAIT_MS)
    assert page.input_value("#prompt")  # the server's default prompt arrived

    # Webcam img2img with Chromium's fake camera.
    page.select_option("#source", "webcam")
    page.click("#toggle")
    page.wait_for_function("Number(document.getElementById('outputs').textContent) >= 3", timeout=WAIT_MS,
                           polling=POLL_MS)
    fps = page.text_content("#fps")
    assert float(fps) > 0
    page.wait_for_function("(before) => document.getElementById('fps').textContent !== before", arg=fps,
                           timeout=WAIT_MS, polling=POLL_MS)  # the readout moves
    # The counters move with each frame's header; its picture comes after and decodes later still.
    page.wait_for_function("document.getElementById('output').naturalWidth > 0", timeout=WAIT_MS,
                           polling=POLL_MS)
    output_size = page.evaluate("[document.getElementById('output').naturalWidth, "
                                "document.getElementById('output').naturalHeight]")
    assert output_size == [64, 64]  # a generated frame is shown
    camera_spread = page.evaluate("""() => {
        const c = document.getElementById('input');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let low = 255, high = 0;
        for (let i = 0; i < d.length; i += 4) { low = Math.min(low, d[i + 1]); high = Math.max(high, d[i + 1]); }
        return high - low;
    }""")
    assert camera_spread > 50  # the fake camera's picture is drawn on the input view, not a blank
    assert "error" not in page.text_content("#status")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-browser-webcam.png"))

    # The built-in moving-shapes source, for machines without a camera.
    page.select_option("#source", "shapes")
    before = number(page, "outputs")
    page.wait_for_function("(n) => Number(document.getElementById('outputs').textContent) >= n + 3",
                           arg=before, timeout=WAIT_MS, polling=POLL_MS)
    shapes_background = page.evaluate("Array.from(document.getElementById('input').getContext('2d')"
                                      ".getImageData(2, 2, 1, 1).data.slice(0, 3))")
    assert shapes_background == [0x1e, 0x2a, 0x5a]  # the shapes scene, no longer the camera

    # txt2img: switching the source restarts the stream; typing a prompt regenerates.
    page.select_option("#source", "txt2img")
    page.wait_for_function("/^(txt2img|error)/.test(document.getElementById('status').textContent)",
                           timeout=WAIT_MS, polling=POLL_MS)
    assert page.text_content("#status").startswith("txt2img")  # restarted, and no stray frame was refused
    before = number(page, "outputs")
    page.fill("#prompt", "a large yellow square, green background")
    page.wait_for_function("(n) => Number(document.getElementById('outputs').textContent) >= n + 2",
                           arg=before, timeout=WAIT_MS, polling=POLL_MS)
    page.screenshot(path=str(ARTIFACTS / "demo-browser-txt2img.png"))
    page.click("#toggle")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=WAIT_MS,
                           polling=POLL_MS)
    assert problems == []
    page.close()
