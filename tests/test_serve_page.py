"""The chat page at `/` in headless Chromium (Debian's chromium + chromium-driver, via selenium):
a reply streams in, Stop cancels it on the server, and the next turn carries the history."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.serving import ServerProcess, serve_checkpoint

KEY = "page-key"


@pytest.fixture
def chromium_tmp():
    """A short folder of Chromium's own, removed afterwards. Its singleton socket goes in TMPDIR,
    and a UNIX socket's path holds at most 107 bytes: under pytest's folders
    (/tmp/pytest-of-root/pytest-986/test_code_fences_render_as_cod0/...) it did not fit once the
    run counter grew, and Chromium exited at start ("session not created")."""
    tmp = Path(tempfile.mkdtemp(prefix="amlx-cr-", dir="/tmp" if os.path.isdir("/tmp") else None))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _driver(tmp):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.fail("headless Chromium is needed: apt-get install chromium chromium-driver (.ci/run does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    # (Chromium's profile and singleton folders go under `tmp`, not straight into /tmp, where
    # they stayed behind after every run)
    opts.add_argument(f"--user-data-dir={tmp / 'profile'}")
    env = {**os.environ, "TMPDIR": str(tmp)}
    return webdriver.Chrome(service=Service(chromedriver, env=env), options=opts)


def _wait(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = serve_checkpoint(tmp_path_factory.mktemp("page-ckpt"), seed=3)
    log = tmp_path_factory.mktemp("page-log") / "requests.jsonl"
    # the long first reply keeps streaming until Stop: greedy, this checkpoint never samples EOS
    # (at the page's default temperature it may, and then the reply ended before Stop), and its
    # 20,000 tokens take far longer than the test's clicks (6,000 took 3-5 s here)
    with ServerProcess(ckpt, "--model-name", "tiny", "--log-requests", str(log), "--max-context", "32768",
                       api_key=KEY) as srv:
        srv.request_log = log
        yield srv


def test_chat_page_streams_stops_and_keeps_history(server, chromium_tmp):
    from selenium.webdriver.common.by import By

    driver = _driver(chromium_tmp)
    try:
        driver.get(server.url + "/")
        find = lambda css: driver.find_element(By.CSS_SELECTOR, css)  # noqa: E731
        find("#api-key").send_keys(KEY)
        driver.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        _wait(lambda: find("#model").get_attribute("data-state") == "ready", what="the model list")
        assert find("#model").text == "tiny"
        find("#system").send_keys("You are terse.")
        driver.execute_script("document.getElementById('max-tokens').value = '20000'")
        driver.execute_script("document.getElementById('temperature').value = '0'")
        auth = {"Authorization": f"Bearer {KEY}"}
        cancelled = lambda: sum(v for k, v in server.metrics(auth).items()  # noqa: E731
                                if k.startswith("amlx_requests_cancelled_total"))
        before = cancelled()

        # 1. a message: the reply streams in (text shows while the reply is still running)
        find("#input").send_keys("Tell me a long story.")
        find("#send").click()
        reply = lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]  # noqa: E731
        _wait(lambda: len(reply().find_element(By.CSS_SELECTOR, ".body").text) > 20, what="streamed text")
        assert reply().get_attribute("data-state") == "streaming"

        # 2. Stop: the fetch is aborted and the server cancels the generation
        find("#stop").click()
        _wait(lambda: reply().get_attribute("data-state") == "stopped", what="the stopped state")
        _wait(lambda: cancelled() == before + 1, what="the server's cancellation count")
        first_reply = driver.execute_script(  # the raw text (selenium's .text normalizes whitespace)
            "return document.querySelector('.msg.assistant .body').textContent")
        assert first_reply
        assert "stopped" in reply().find_element(By.CSS_SELECTOR, ".stats").text

        # 3. a second turn: its request carries the system prompt, the first turn and its partial reply
        driver.execute_script("document.getElementById('max-tokens').value = '8'")
        find("#input").send_keys("And another?")
        find("#send").click()
        _wait(lambda: reply().get_attribute("data-state") == "done", what="the second reply")
        assert "tok/s" in reply().find_element(By.CSS_SELECTOR, ".stats").text
        assert "TTFT" in reply().find_element(By.CSS_SELECTOR, ".stats").text
        first, last = [json.loads(line)["body"] for line in server.request_log.read_text().splitlines()][-2:]
        assert (first["temperature"], first["max_tokens"]) == (0, 20000)  # greedy: no early EOS
        roles = [m["role"] for m in last["messages"]]
        assert roles == ["system", "user", "assistant", "user"]
        assert last["messages"][1]["content"] == "Tell me a long story."
        assert last["messages"][2]["content"] == first_reply  # the stopped reply, as far as it got
        assert last["max_tokens"] == 8 and last["stream"] is True
    finally:
        driver.quit()


def test_code_fences_render_as_code_and_html_stays_text(server, chromium_tmp):
    from selenium.webdriver.common.by import By

    driver = _driver(chromium_tmp)
    try:
        driver.get(server.url + "/")
        driver.execute_script("""
            const el = document.createElement('div'); el.id = 'probe'; document.body.append(el);
            render(el, 'before <b>bold</b> ```python\\nprint(1 < 2)\\n``` after <img src=x onerror=alert(1)>');
        """)
        probe = driver.find_element(By.ID, "probe")
        assert probe.find_elements(By.TAG_NAME, "b") == [] and probe.find_elements(By.TAG_NAME, "img") == []
        code = probe.find_element(By.CSS_SELECTOR, "pre > code")
        assert code.text.strip() == "print(1 < 2)" and code.get_attribute("data-lang") == "python"
        assert "<b>bold</b>" in probe.text
    finally:
        driver.quit()
