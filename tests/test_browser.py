"""The playground page in headless Chromium (Debian's package) driven by selenium: a person's
view of /imagine, a button click and a modal."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import Harness

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("SDBOT_ARTIFACTS", "artifacts"))

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="Chromium is installed by `make test` (Debian packages chromium, chromium-driver)",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def click_button(browser: webdriver.Chrome, label: str, *, last: bool = False) -> None:
    """Click a message button by its label; the page may re-render under us, so retry."""
    for _ in range(20):
        try:
            found = [
                b for b in browser.find_elements(By.CSS_SELECTOR, ".msg button") if label in b.text
            ]
            if found:
                (found[-1] if last else found[0]).click()
                return
        except StaleElementReferenceException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no {label!r} button")


async def test_imagine_and_a_button_in_the_playground_page(
    harness: Harness, browser: webdriver.Chrome
) -> None:
    def run() -> None:
        browser.get(harness.control.base_url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#user option")))
        box = browser.find_element(By.ID, "cmd")
        box.send_keys("/imagine prompt: a red fox in snow steps: 3 seed: 42")
        browser.find_element(By.ID, "send").click()
        image = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".msg img")))
        wait.until(
            lambda d: d.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", image
            )
        )
        assert image.get_attribute("naturalWidth") == "64"
        assert "seed 42 ·" in browser.find_element(By.ID, "log").text
        # Click Reroll: a second image appears.
        click_button(browser, "Reroll")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg img")) >= 2)
        # Edit prompt opens a modal, prefilled; submit a new prompt.
        click_button(browser, "Edit prompt")
        area = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#modal textarea")))
        assert area.get_attribute("value") == "a red fox in snow"
        area.clear()
        area.send_keys("a blue fox")
        browser.find_element(By.ID, "modalok").click()
        wait.until(lambda d: "a blue fox" in d.find_element(By.ID, "log").text)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg img")) >= 3)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "playground.png"))

    await asyncio.to_thread(run)
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000
