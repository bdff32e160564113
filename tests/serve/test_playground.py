"""The playground page for what #15 added, in a real headless browser: a multi-task classification server
(generation-only fields hidden, the base's untrained head labelled, names per head, a regression value) and
JSON mode on a generation server (the output parses and validates). Screenshots are saved."""

from __future__ import annotations

import json

import pytest

from tests.serve.helpers import serving
from tests.serve.helpers_browser import needs_browser, playground, screenshot
from tests.serve.helpers_heads import HEADS, save_heads

pytestmark = needs_browser
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 5}, "ok": {"type": "boolean"}}}


def test_playground_multi_task_heads(tmp_path):
    from selenium.webdriver.common.by import By

    base, adapters = save_heads(tmp_path)
    with serving(base, adapters) as (url, _), playground(url, models=4) as (driver, wait):
        for field in ("max_tokens", "temperature", "json_mode"):  # generation only
            assert not driver.find_element(By.ID, field).is_displayed(), field
        base_label = driver.find_element(By.CSS_SELECTOR, "#adapters label[data-model='bert']")
        assert "untrained head" in base_label.text
        for box in driver.find_elements(By.CSS_SELECTOR, "#adapters input"):
            if not box.is_selected():
                box.click()  # the base too
        driver.find_element(By.ID, "prompt").send_keys("a great movie")
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.done")) == 4)
        cards = {c.get_attribute("data-model"): c for c in driver.find_elements(By.CSS_SELECTOR, ".card")}
        for name, labels in HEADS.items():
            card = cards[name]
            if labels is None:
                assert card.find_element(By.CSS_SELECTOR, ".value").text.startswith("value ")
                assert not card.find_elements(By.CSS_SELECTOR, ".bar")
            else:
                assert [e.text for e in card.find_elements(By.CSS_SELECTOR, ".bar .name")] == labels
            assert not card.find_elements(By.CSS_SELECTOR, ".note")
        assert "untrained head" in cards["bert"].find_element(By.CSS_SELECTOR, ".note").text
        assert len(cards["bert"].find_elements(By.CSS_SELECTOR, ".bar")) == 3  # the first adapter's shape
        screenshot(driver, tmp_path, "playground-heads.png")


def test_playground_json_mode(json_llama, tmp_path):
    from selenium.webdriver.common.by import By

    jsonschema = pytest.importorskip("jsonschema")
    with serving(json_llama) as (url, _), playground(url, models=1) as (driver, wait):
        assert not driver.find_element(By.ID, "schema").is_displayed()
        driver.find_element(By.ID, "json_mode").click()
        driver.find_element(By.ID, "schema").send_keys(json.dumps(SCHEMA))
        driver.find_element(By.ID, "prompt").send_keys("the cat sat")
        max_tokens = driver.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("64")  # the schema's longest output is ~30 tokens: the grammar ends the row
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.done")) == 1)
        text = driver.find_element(By.CSS_SELECTOR, ".card .out").text
        jsonschema.validate(json.loads(text), SCHEMA)
        screenshot(driver, tmp_path, "playground-json.png")
