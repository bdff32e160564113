"""The playground page in a real headless browser (Debian's chromium + chromium-driver, driven by selenium); the
tests that use it are skipped with a reason where chromium is not installed (CI installs it: see .ci/run)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium / chromium-driver not installed "
                                   "(apt-get install chromium chromium-driver)")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,700", "--no-proxy-server"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


@contextlib.contextmanager
def playground(url: str, models: int):
    """The page of the server at ``url`` in a fresh browser, once its ``models`` adapter boxes (the base among
    them) are listed; yields ``(driver, wait)`` (a 30 s ``WebDriverWait``); the browser quits on exit."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#adapters input")) == models)
        yield driver, wait
    finally:
        driver.quit()


def screenshot(driver, tmp_path: Path, name: str, min_bytes: int = 1000) -> None:
    """Save the page as ``name`` in ``$LORAKIT_SCREENSHOT_DIR`` (default: ``tmp_path``); it is not empty."""
    shot = Path(os.environ.get("LORAKIT_SCREENSHOT_DIR", tmp_path)) / name
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > min_bytes
