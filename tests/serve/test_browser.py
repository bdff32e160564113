"""The playground page in a real headless browser (Debian's chromium + chromium-driver, driven by selenium):
load the page, type, tick adapters, run, read each adapter's streamed output and latency, screenshot.

Skipped with a reason where chromium is not installed (CI installs it: see .ci/run)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.serve.helpers import serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium / chromium-driver not installed "
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


def test_playground_generation_side_by_side(server, client, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    want = {m: client.completions.create(model=m, prompt="the cat sat", max_tokens=12, temperature=0)
            .choices[0].text for m in ("a", "b")}
    driver = browser()
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#adapters input")) == 4)
        for box in driver.find_elements(By.CSS_SELECTOR, "#adapters input"):
            if box.is_selected() != (box.get_attribute("value") in ("a", "b")):
                box.click()
        driver.find_element(By.ID, "prompt").send_keys("the cat sat")
        max_tokens = driver.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("12")
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.done")) == 2)
        cards = {c.get_attribute("data-model"): c for c in driver.find_elements(By.CSS_SELECTOR, ".card")}
        assert set(cards) == {"a", "b"}
        for m, card in cards.items():
            assert card.find_element(By.CSS_SELECTOR, ".out").text == want[m].strip()
            assert card.find_element(By.CSS_SELECTOR, ".latency").text.startswith("latency ")
        shot = Path(os.environ.get("LORAKIT_SCREENSHOT_DIR", tmp_path)) / "playground-generate.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    finally:
        driver.quit()


def test_playground_classification_bars(bert_dir, bert_adapters, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(bert_dir, bert_adapters) as (url, _):
        driver = browser()
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#adapters input")) == 4)
            driver.find_element(By.ID, "prompt").send_keys("a great movie")
            driver.find_element(By.ID, "run").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.done")) == 3)  # x, y, z ticked
            for card in driver.find_elements(By.CSS_SELECTOR, ".card"):
                names = [e.text for e in card.find_elements(By.CSS_SELECTOR, ".bar .name")]
                assert names == ["neg", "neu", "pos"], card.text
                probs = [float(e.text) for e in card.find_elements(By.CSS_SELECTOR, ".bar .p")]
                assert abs(sum(probs) - 1) < 0.01  # three decimals each
                assert card.find_element(By.CSS_SELECTOR, ".label").text in names
            shot = Path(os.environ.get("LORAKIT_SCREENSHOT_DIR", tmp_path)) / "playground-classify.png"
            assert driver.save_screenshot(str(shot))
        finally:
            driver.quit()
