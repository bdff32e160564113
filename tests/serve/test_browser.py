"""The playground page in a real headless browser (Debian's chromium + chromium-driver, driven by selenium):
load the page, type, tick adapters, run, read each adapter's streamed output and latency, screenshot.

Skipped with a reason where chromium is not installed (CI installs it: see .ci/run)."""

from __future__ import annotations

from tests.serve.helpers import serving
from tests.serve.helpers_browser import needs_browser, playground, screenshot

pytestmark = needs_browser


def test_playground_generation_side_by_side(server, client, tmp_path):
    from selenium.webdriver.common.by import By

    want = {m: client.completions.create(model=m, prompt="the cat sat", max_tokens=12, temperature=0)
            .choices[0].text for m in ("a", "b")}
    with playground(server.url, models=4) as (driver, wait):
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
        screenshot(driver, tmp_path, "playground-generate.png")


def test_playground_classification_bars(bert_dir, bert_adapters, tmp_path):
    from selenium.webdriver.common.by import By

    with serving(bert_dir, bert_adapters) as (url, _), playground(url, models=4) as (driver, wait):
        driver.find_element(By.ID, "prompt").send_keys("a great movie")
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.done")) == 3)  # x, y, z ticked
        for card in driver.find_elements(By.CSS_SELECTOR, ".card"):
            names = [e.text for e in card.find_elements(By.CSS_SELECTOR, ".bar .name")]
            assert names == ["neg", "neu", "pos"], card.text
            probs = [float(e.text) for e in card.find_elements(By.CSS_SELECTOR, ".bar .p")]
            assert abs(sum(probs) - 1) < 0.01  # three decimals each
            assert card.find_element(By.CSS_SELECTOR, ".label").text in names
        screenshot(driver, tmp_path, "playground-classify.png", min_bytes=0)
