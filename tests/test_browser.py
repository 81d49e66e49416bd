"""The playground page in headless Chromium (Debian's package) driven by selenium: a person's
view of /imagine, a button click and a modal; and what the page does with hostile names and
links (it must show them as text, never as markup).

Locally these tests skip when Chromium or selenium is missing; in CI (CI=true) they fail
instead, so a broken browser install cannot pass as green.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from bench.harness import Harness
from bot.localdiscord.client import ControlClient
from bot.localdiscord.server import LocalDiscord

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("SDBOT_ARTIFACTS", "artifacts"))
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing() -> str | None:
    if not HAVE_SELENIUM:
        return "selenium is not installed (it is in the dev extras)"
    absent = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if absent:
        return (
            f"{' and '.join(absent)} not found: `make test` installs the Debian packages "
            "chromium and chromium-driver"
        )
    return None


@pytest.fixture(autouse=True)
def _require_a_browser() -> None:
    """Autouse, so it runs before the bot harness starts: a skip costs nothing."""
    why = _missing()
    if why is None:
        return
    if IN_CI:
        pytest.fail(f"CI must run the browser tests, but {why}", pytrace=False)
    pytest.skip(why)


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
        browser.get(harness.server.playground_url)
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


@pytest.fixture
async def server() -> AsyncIterator[LocalDiscord]:
    """The local server alone: the page renders what members post, no bot needed."""
    server = LocalDiscord()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


EVIL_NAME = '<img src=x onerror="window.__pwned=1">'
QUOTED_LINK = 'https://example.com/a"onmouseover="window.__pwned=1'


async def test_the_page_shows_hostile_names_and_links_as_text(
    server: LocalDiscord, browser: webdriver.Chrome
) -> None:
    async with aiohttp.ClientSession() as session:
        c = ControlClient(server.base_url, session, token=server.control_token)
        evil = await c.add_user(EVIL_NAME)
        await c.post_message(
            f"hi <@{evil}>, see [the docs]({QUOTED_LINK}) or [this](javascript:alert(1)) "
            f"{EVIL_NAME} **bold**",
            user_id=evil,
        )

    def run() -> None:
        wait = WebDriverWait(browser, 30)
        # Without the token from the printed URL the page says where to get it.
        browser.get(server.base_url + "/")
        wait.until(lambda d: "#token=" in d.find_element(By.ID, "status").text)
        browser.get(server.playground_url)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#log .msg")))
        assert "token=" not in browser.current_url, "the token stays out of the address bar"
        log = browser.find_element(By.ID, "log")
        assert log.find_elements(By.CSS_SELECTOR, "img") == []
        injected = "[onerror], [onmouseover], [onclick], a[href^='javascript']"
        assert browser.find_elements(By.CSS_SELECTOR, injected) == []
        assert f"@{EVIL_NAME}" in log.text  # the mention, as text
        assert log.find_element(By.CSS_SELECTOR, ".who").text == EVIL_NAME
        links = log.find_elements(By.CSS_SELECTOR, "a")
        assert [a.get_attribute("href") for a in links] == [
            QUOTED_LINK.replace('"', "%22")  # the quote stayed inside the one attribute
        ]
        assert [b.text for b in log.find_elements(By.CSS_SELECTOR, ".content b")][-1] == "bold"
        names = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#user option")]
        assert EVIL_NAME in names
        assert browser.execute_script("return window.__pwned") is None

    await asyncio.to_thread(run)
