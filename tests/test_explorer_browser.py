"""
The explorer page end to end in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`
packages, never a browser download) driven by selenium opens the page, uploads an image, applies an edit and checks
that the edited decoding changed.

Skips, with the reason, where gradio, selenium, /usr/bin/chromium or /usr/bin/chromedriver is missing (`.ci/run`
installs the browser). `STELLAR_UPDATE_SCREENSHOT=1` writes the screenshot to docs/images/explorer.png (the one
docs/explorer.md shows); `STELLAR_EXPLORER_MODEL=FOLDER` runs the page on that model instead of a tiny random one
(a trained model makes a better screenshot).
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stellar_tester import tiny_config

from stellar_hf import StellarForImageReconstruction, StellarImageProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "explorer.py"
CHROMIUM = Path(os.environ.get("STELLAR_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("STELLAR_CHROMEDRIVER", "/usr/bin/chromedriver"))
SCREENSHOT = REPO_ROOT / "docs" / "images" / "explorer.png"
# Flags for a closed network: without the background-networking ones Chromium stalls on its update and sync calls.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--window-size=1280,2100",
]
TIMEOUT = 60.0


def _missing() -> str | None:
    for module in ("gradio", "selenium"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"no browser: {path} is missing (apt-get install {package}; .ci/run does it)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("stellar_explorer_page", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model_dir(tmp_path) -> Path:
    configured = os.environ.get("STELLAR_EXPLORER_MODEL")
    if configured:
        return Path(configured)
    config = tiny_config(image_size=64, patch_size=16, num_sparse_tokens=6)
    folder = tmp_path / "tiny-stellar"
    StellarForImageReconstruction(config).save_pretrained(folder)
    StellarImageProcessor.from_model_config(config).save_pretrained(folder)
    return folder


@pytest.fixture
def page(model_dir):
    """The explorer page served on a free port, in this process; yields its URL."""
    from stellar_hf.explorer import load_explorer, sample_images

    script = _load_script()
    explorer = load_explorer(model_dir)
    demo = script.build_demo(explorer, sample_images(2, 96))
    port = _free_port()
    demo.queue().launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        **script.launch_options(),
    )
    try:
        yield f"http://127.0.0.1:{port}/", explorer
    finally:
        demo.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault(
        "SE_OFFLINE", "true"
    )  # selenium-manager must never try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(condition, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _image_src(driver, elem_id: str) -> str | None:
    from selenium.webdriver.common.by import By

    images = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
    return images[0].get_attribute("src") if images else None


def _pixels(src: str) -> np.ndarray:
    with urllib.request.urlopen(src, timeout=30) as response:
        return np.asarray(
            Image.open(io.BytesIO(response.read())).convert("RGB"), dtype=np.int16
        )


def test_upload_edit_and_see_the_decoding_change(page, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, explorer = page
    from stellar_hf.data import SyntheticScenes

    photo = tmp_path / "photo.png"
    SyntheticScenes(num_images=4, image_size=128, split="test")[3]["image"].save(photo)

    browser.get(url)
    upload = _wait(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]"),
        "the upload field",
    )
    upload[0].send_keys(str(photo))
    before = _wait(
        lambda: _image_src(browser, "edited-decoding"),
        "the decoding of the uploaded image",
    )
    _wait(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#overlays img")) >= 2,
        "the spatial-map overlays",
    )
    assert explorer.encoder_calls == 1

    browser.find_element(
        By.CSS_SELECTOR, "#apply-edit"
    ).click()  # the default edit: drop token 0
    after = _wait(
        lambda: (src := _image_src(browser, "edited-decoding")) != before and src,
        "the edited decoding to change",
    )
    _wait(
        lambda: (
            "decoder" in browser.find_element(By.CSS_SELECTOR, "#edit-latency").text
        ),
        "the edit's latency",
    )
    assert explorer.encoder_calls == 1, "an edit ran the encoder again"
    original, edited = _pixels(before), _pixels(after)
    assert original.shape == edited.shape
    assert np.abs(original - edited).max() > 0, "the edited decoding did not change"

    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "explorer.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
    if os.environ.get("STELLAR_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
