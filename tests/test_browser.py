"""The playground page in headless Chromium (Debian's package) driven by selenium: a person's
view of /imagine, a button click and a modal (its fields stacked), following the newest message;
an admin's subcommands, a mistyped option refused, the /stats chart opened full size; and what
the page does with hostile names and links (it must show them as text, never as markup).
Screenshots go to artifacts/ for a person to look at.

Locally these tests skip when Chromium or selenium is missing; in CI (CI=true) they fail
instead, so a broken browser install cannot pass as green.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from bench.harness import Harness
from bot.localdiscord.client import ControlClient
from bot.localdiscord.server import LocalDiscord
from tests.images import photo

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("SDBOT_ARTIFACTS", "artifacts"))
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
T = TypeVar("T")


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


# The newest message is in the log's view (its bottom edge inside the log's box).
NEWEST_IN_VIEW = """
const log = document.getElementById("log"), msgs = log.querySelectorAll(".msg");
if (!msgs.length) return false;
const last = msgs[msgs.length - 1].getBoundingClientRect(), box = log.getBoundingClientRect();
return last.bottom <= box.bottom + 2 && last.bottom > box.top;
"""
IMAGES_LOADED = "return [...document.querySelectorAll('.msg img')].every((i) => i.complete)"
# Title, each label and field, then the buttons: each starts below the one before, and the
# fields are about as wide as the dialog, not squeezed into a row with the title.
MODAL_STACKS = """
const form = document.getElementById("modalform").getBoundingClientRect();
const els = [document.getElementById("modaltitle"),
  ...document.querySelectorAll("#modalfields > *"), document.getElementById("modalok")];
let below = -Infinity;
for (const el of els) {
  const r = el.getBoundingClientRect();
  if (r.top < below - 1) return `${el.tagName} ${el.textContent} starts above the one before`;
  below = r.bottom;
}
for (const f of document.querySelectorAll("#modalfields textarea, #modalfields input"))
  if (f.getBoundingClientRect().width < form.width * 0.9) return "a field is narrow";
return "stacked";
"""


def send_command(browser: webdriver.Chrome, text: str) -> None:
    box = browser.find_element(By.ID, "cmd")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def log_text(browser: webdriver.Chrome) -> str:
    for _ in range(5):
        try:
            return str(browser.find_element(By.ID, "log").text)
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise AssertionError("the log kept changing")


async def test_imagine_buttons_a_modal_and_scrolling_in_the_playground_page(
    harness: Harness, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    c = harness.control

    def call(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    # Enough pictures before the page opens that the log scrolls; they load after the text, so
    # the page must keep following the newest message as they come in.
    for i in range(4):
        picture = await c.upload(photo((64, 64)), f"old{i}.png", "image/png")
        await c.post_message(f"earlier picture {i}", attachments=[picture])

    def run() -> None:
        browser.get(harness.server.playground_url)
        wait = WebDriverWait(browser, 60)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#user option")))
        wait.until(lambda d: "earlier picture 3" in log_text(d))
        wait.until(lambda d: d.execute_script(IMAGES_LOADED))
        assert browser.execute_script(NEWEST_IN_VIEW), "the page opens at the newest message"
        send_command(browser, "/imagine prompt: a red fox in snow steps: 3 seed: 42")
        wait.until(lambda d: "seed 42 ·" in log_text(d))
        wait.until(lambda d: d.execute_script(IMAGES_LOADED))
        image = browser.find_elements(By.CSS_SELECTOR, ".msg img")[-1]
        assert image.get_attribute("naturalWidth") == "64"
        wait.until(lambda d: d.execute_script(NEWEST_IN_VIEW), "the result scrolls into view")
        # Click Reroll: a second image appears.
        click_button(browser, "Reroll")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg img")) >= 6)
        # Edit prompt opens a modal, prefilled, its fields one under the other; submit it.
        click_button(browser, "Edit prompt")
        area = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#modal textarea")))
        assert area.get_attribute("value") == "a red fox in snow"
        assert browser.execute_script(MODAL_STACKS) == "stacked"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "playground-modal.png"))
        area.clear()
        area.send_keys("a blue fox")
        browser.find_element(By.ID, "modalok").click()
        wait.until(lambda d: "a blue fox" in log_text(d))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg img")) >= 7)
        wait.until(lambda d: d.execute_script(IMAGES_LOADED))
        wait.until(lambda d: d.execute_script(NEWEST_IN_VIEW))
        browser.save_screenshot(str(ARTIFACTS / "playground.png"))
        # Someone who scrolled up to read stays where they are when a message arrives ...
        browser.execute_script("document.getElementById('log').scrollTop = 0")
        time.sleep(0.3)  # the scroll event
        call(c.post_message("a message while you read"))
        wait.until(lambda d: "a message while you read" in log_text(d))
        assert browser.execute_script("return document.getElementById('log').scrollTop") == 0
        # ... and a button takes them to it.
        jump = wait.until(ec.visibility_of_element_located((By.ID, "jump")))
        jump.click()
        wait.until(lambda d: d.execute_script(NEWEST_IN_VIEW))
        # The 📎 button the help mentions: a picture chosen there becomes /img2img's image.
        browser.find_element(By.ID, "file").send_keys(str(upload))
        wait.until(lambda d: "Attached: cat.png" in d.find_element(By.ID, "files").text)
        send_command(browser, "/img2img prompt: a night scene steps: 2 seed: 5")
        wait.until(lambda d: "a night scene" in log_text(d) and "seed 5 ·" in log_text(d))
        wait.until(lambda d: d.execute_script(IMAGES_LOADED))
        wait.until(lambda d: d.execute_script(NEWEST_IN_VIEW))

    upload = tmp_path / "cat.png"
    upload.write_bytes(photo())
    await asyncio.to_thread(run)
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000


async def test_admin_subcommands_options_and_the_stats_chart_in_the_playground_page(
    harness: Harness, browser: webdriver.Chrome
) -> None:
    def run() -> None:
        browser.get(harness.server.playground_url)
        wait = WebDriverWait(browser, 60)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#user option")))
        Select(browser.find_element(By.ID, "user")).select_by_visible_text("admin (admin)")
        # A subcommand's option offers the bot's suggestions, as its own top-level ones do.
        box = browser.find_element(By.ID, "cmd")
        box.send_keys("/config set key: max_st")
        wait.until(lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "#suggest button")])
        suggestion = browser.find_element(By.CSS_SELECTOR, "#suggest button")
        assert suggestion.text == "max_steps"
        suggestion.click()
        assert box.get_attribute("value") == "/config set key: max_steps "
        # Subcommands (and a group's) reach the bot nested, as Discord sends them.
        for typed, answer in [
            ("/config show", "sdbot settings"),
            ("/config set key: max_steps value: 30", "max_steps is now 30"),
            ("/config set max_steps value: 40", "max_steps is now 40"),
            ("/config channels list", "All channels (the list is empty)."),
            ("/config blocklist add pattern: xyzzy", "Blocking xyzzy"),
        ]:
            send_command(browser, typed)
            wait.until(lambda d, answer=answer: answer in log_text(d), typed)
            assert "Something went wrong" not in log_text(browser), typed
            assert browser.find_element(By.ID, "status").text == "", typed
        # An option the command does not have is refused, not added to the prompt.
        send_command(browser, "/imagine prompt: a cat sampler: Euler")
        wait.until(lambda d: "sampler: is not an option" in d.find_element(By.ID, "status").text)
        assert "scheduler" in browser.find_element(By.ID, "status").text
        assert "a cat sampler" not in log_text(browser)
        # The chart is shown wider than a generated thumbnail and opens at full size.
        send_command(browser, "/stats")
        wait.until(lambda d: "sdbot usage" in log_text(d))
        wait.until(lambda d: d.execute_script(IMAGES_LOADED))
        chart = browser.find_elements(By.CSS_SELECTOR, ".msg img")[-1]
        assert chart.get_attribute("naturalWidth") == "800"
        assert chart.size["width"] >= 500
        browser.save_screenshot(str(ARTIFACTS / "playground-admin.png"))
        chart.click()
        full = wait.until(ec.visibility_of_element_located((By.ID, "fullimg")))
        wait.until(lambda d: full.size["width"] == 800)
        link = browser.find_element(By.ID, "fullopen").get_attribute("href")
        assert link == chart.get_attribute("src")
        browser.save_screenshot(str(ARTIFACTS / "playground-chart.png"))
        full.click()
        wait.until(ec.invisibility_of_element_located((By.ID, "lightbox")))

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(run)


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
