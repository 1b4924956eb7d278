"""The chat page (clients/web) in a real browser: headless Chromium, driven by Selenium.

One whole round through what `scripts/demo --web` runs: a real `relayd run` with its edge,
examples/business_echo.py (--desk) as the business, the page served on loopback. The page
makes its keys in the browser and the demo enrols it with the identity service's register
request over AMQP; then it starts a conversation, types, sees the echo, the business
typing and its read receipt, answers a quick reply, a list picker and a time picker, shows
a rich link without fetching anything, quotes a message, puts a reaction on and takes it
off (the business echoes both), and deletes the conversation, which the business sees as
`close`. A second browser, the user's second device, shows the echoes and the deletion. A
screenshot is saved as an artifact.

Skipped, with the reason, where Chromium, its driver, Selenium or the SDK's npm packages
are missing; scripts/setup installs them all.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
WAIT = 30.0  # seconds for any one step: bounded, never a timed assertion
ARTIFACTS = Path(os.environ.get("RELAYD_TEST_ARTIFACTS", REPO / ".artifacts"))


def _why_not() -> str | None:
    if CHROMIUM is None or DRIVER is None:
        return "chromium and chromium-driver are not installed (scripts/setup installs them)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    if not (REPO / "clients" / "js" / "node_modules" / "@hpke" / "core").is_dir():
        return "the SDK's npm packages are not installed (scripts/setup runs npm ci)"
    return None


pytestmark = [pytest.mark.browser, pytest.mark.skipif(_why_not() is not None,
                                                      reason=str(_why_not()))]


class Demo:
    """`scripts/demo.py --web` as a subprocess, its output read line by line."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "demo.py"), "--web"], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, wait: float = 120.0) -> re.Match[str]:
        """The first line from now on that matches `pattern`, within `wait` seconds."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"no line matching {pattern!r}; the demo said: {self.seen[-20:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture
def demo() -> Iterator[Demo]:
    running = Demo()
    try:
        yield running
    finally:
        try:
            running.stop()  # SIGTERM: the demo stops relayd and the echo, drops its vhost
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait(timeout=30)
        running.reader.join(timeout=30)  # to the end of its output
        assert running.process.stdout is not None
        running.process.stdout.close()


def _chromium(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--user-data-dir={profile}", "--window-size=1000,1400"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=str(DRIVER)))


@pytest.fixture
def browsers(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """Two browsers, each with a profile of its own: two devices of the demo's user."""
    first = _chromium(tmp_path / "first")
    try:
        second = _chromium(tmp_path / "second")
        try:
            yield first, second
        finally:
            second.quit()
    finally:
        first.quit()


class Page:
    """The chat page, found by its data-test hooks. The page draws its list anew on each
    change, so messages are held by their id and looked up again for each step."""

    def __init__(self, driver: Any) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.waiter = WebDriverWait(driver, WAIT, ignored_exceptions=[_stale()])

    def until(self, check: Callable[[], Any], what: str) -> Any:
        return self.waiter.until(lambda _: check(), message=what)

    def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def one(self, css: str) -> Any:
        return self.until(lambda: (self.all(css) or [None])[0], css)

    def click(self, css: str) -> None:
        self.until(lambda: self.one(css).click() or True, f"click {css}")

    def attribute(self, css: str, name: str) -> str | None:
        return self.until(lambda: [self.one(css).get_attribute(name)], css)[0]

    def message(self, sender: str, text: str) -> str:
        """The id of the (last) message from `sender` ("me" or "business") showing `text`."""
        def find() -> str | None:
            for item in reversed(self.all(f'li[data-test="message"][data-from="{sender}"]')):
                content = item.find_elements("css selector", '[data-test="content"]')
                if content and content[0].text == text:
                    return str(item.get_attribute("data-id"))
            return None
        return str(self.until(find, f"a message from {sender}: {text}"))

    def write(self, text: str) -> None:
        self.one('#text').send_keys(text)
        self.click('[data-test="send"]')

    def answered(self, picker: str, text: str) -> str:
        """The business's answer `text`, which quotes `picker`; its id."""
        answer = self.message("business", text)
        assert self.attribute(f'li[data-id="{answer}"] [data-test="quote"]', "data-of") == picker
        return answer


def _stale() -> type[Exception]:
    from selenium.common.exceptions import StaleElementReferenceException

    return StaleElementReferenceException


KEYS_IN_INDEXEDDB = """
const done = arguments[arguments.length - 1];
const open = indexedDB.open("relayd-web");
open.onsuccess = () => {
  const get = open.result.transaction("device").objectStore("device").get("keys");
  get.onsuccess = () => done([get.result.signPrivate, get.result.encPrivate].map(
    (key) => [key instanceof CryptoKey, key.extractable, key.type]));
};
"""


def test_a_whole_round_in_chromium(demo: Demo, browsers: tuple[Any, Any]) -> None:
    """Enrol, start, type, reply, typing and read receipt, every picker answered, a rich
    link shown without a fetch, a quote, a reaction on and off, delete: all through a real
    relay, edge and business_echo. The user's second device (another browser) shows the
    start, the answer and the reaction as echoes, and the deletion."""
    browser, other_browser = browsers
    url = demo.wait_for(r"the chat page: (http://127\.0\.0\.1:\d+/web/)").group(1)
    page, other = Page(browser), Page(other_browser)
    for driver, each in ((browser, page), (other_browser, other)):
        driver.get(url)
        each.until(lambda e=each: e.attribute('[data-test="status"]', "data-state") == "ready",
                   "the page logged in to the edge")
        device = each.attribute('[data-test="registration"]', "data-device")
        demo.wait_for(rf"enrolled the page's device {device} ", WAIT)
    # The private keys are WebCrypto keys that no script can read out, kept in IndexedDB.
    assert browser.execute_async_script(KEYS_IN_INDEXEDDB) == [[True, False, "private"]] * 2

    # Start, then type: the business sees both; it reads, types and echoes.
    page.write("hello")
    demo.wait_for(r"^start event$", WAIT)
    hello = page.message("me", "hello")
    assert other.message("me", "hello") == hello  # the echo, on the other device
    page.until(lambda: page.attribute(f'li[data-id="{hello}"]', "data-state") in ("sent", "read"),
               "the start was acked")
    page.one("#text").send_keys("pi")
    demo.wait_for(r"^typing_start event$", WAIT)
    page.one("#text").send_keys("ng")
    page.click('[data-test="send"]')
    echo = page.message("business", "echo: ping")
    ping = page.message("me", "ping")
    page.until(lambda: page.attribute(f'li[data-id="{ping}"]', "data-state") == "read",
               "the business's read receipt")
    assert int(page.attribute('[data-test="typing"]', "data-seen") or 0) >= 1
    demo.wait_for(r"^read event$", WAIT)  # the page's own read receipt for the echo

    # A quick reply, a list picker (several items) and a time picker, each answered.
    page.write("quick")
    quick = page.message("business", "Do you want Sunday delivery?")
    page.click(f'li[data-id="{quick}"] [data-option="yes"]')
    page.answered(quick, "you chose: Yes")
    assert page.one(f'li[data-id="{quick}"] [data-test="answered"]').text == "You chose: Yes"
    assert not page.one(f'li[data-id="{quick}"] [data-option="no"]').is_enabled()
    other.until(lambda: other.one(f'li[data-id="{quick}"] [data-test="answered"]').text
                == "You chose: Yes", "the answer's echo marks the picker on the other device")

    page.write("menu")
    menu = page.message("business", "What would you like?")
    for item in ("tea", "cake"):
        page.click(f'li[data-id="{menu}"] [data-item="{item}"] input')
    page.click(f'li[data-id="{menu}"] [data-test="choose"]')
    page.answered(menu, "you chose: Tea, Cake")

    page.write("time")
    slots = page.message("business", "When shall we deliver?")
    page.click(f'li[data-id="{slots}"] [data-slot="slot-0"]')
    page.until(lambda: page.all(f'li[data-from="business"] [data-of="{slots}"]'),
               "the slot's answer, quoting the time picker")
    chosen = page.one(f'li[data-id="{slots}"] [data-test="answered"]').text
    assert re.search(r"You chose: .*\d:\d\d", chosen), chosen

    # A rich link: its inline thumbnail shown, nothing fetched from the link's host.
    page.write("link")
    card = page.message("business", "Your order is on its way: https://acme.example/track/1234")
    assert page.attribute(f'li[data-id="{card}"] [data-test="link"]', "href") == \
        "https://acme.example/track/1234"
    assert (page.attribute(f'li[data-id="{card}"] [data-test="thumbnail"]', "src") or "") \
        .startswith("data:image/png;base64,")
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched  # the page's own files, at least
    assert not [name for name in fetched if "acme.example" in name], fetched

    # A quote: reply to the echo.
    page.click(f'li[data-id="{echo}"] [data-test="reply"]')
    page.write("thanks")
    thanks = page.message("me", "thanks")
    assert page.attribute(f'li[data-id="{thanks}"] [data-test="quote"]', "data-of") == echo
    page.message("business", "echo: thanks")

    # A reaction on the echo: the business puts the same one on; then both come off.
    page.click(f'li[data-id="{echo}"] [data-test="react"][data-emoji="👍"]')
    demo.wait_for(r"^reaction event$", WAIT)
    page.one(f'li[data-id="{echo}"] [data-test="reaction"][data-side="business"][data-emoji="👍"]')
    page.one(f'li[data-id="{echo}"] [data-test="reaction"][data-side="me"][data-emoji="👍"]')
    other.one(f'li[data-id="{echo}"] [data-test="reaction"][data-side="me"][data-emoji="👍"]')
    page.click(f'li[data-id="{echo}"] [data-test="react"][data-emoji="👍"][data-on="true"]')
    demo.wait_for(r"^reaction event$", WAIT)
    page.until(lambda: not page.all(f'li[data-id="{echo}"] [data-test="reaction"]'),
               "both reactions taken off")
    other.until(lambda: not other.all(f'li[data-id="{echo}"] [data-test="reaction"]'),
                "and on the other device")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web-round.png"))

    # Delete: the business gets close, and the page shows no conversation.
    page.click('[data-test="delete"]')
    demo.wait_for(r"^close event$", WAIT)
    page.until(lambda: not page.all('li[data-test="message"]'), "the conversation is gone")
    assert page.one('[data-test="send"]').text == "Start conversation"
    other.until(lambda: other.one('[data-test="notice"]').text == "The conversation was closed.",
                "the other device is told")
    assert other.one('[data-test="send"]').text == "Start conversation"
    assert demo.stop() == 0
