"""The chat page at `/`, in a real browser (headless Chromium driven by Selenium) against a real `kiln
serve` on the tiny model: an answer streams in, Stop frees the request on the server, the conversation
carries its history, the API key is asked for and kept, markdown is rendered safely, the page fits a
phone, every control has a name, and nothing (the page, /docs) loads from anywhere but the server.

Waits are explicit (WebDriverWait, polling); nothing sleeps and then asserts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from browser_host import metric, stop_server
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from server_harness import start_cli_server, wait_for

pytestmark = pytest.mark.timeout(900)  # setup included: apt-installing chromium on a clean machine

WAIT = 60  # seconds an explicit wait may take on 2 loaded cores

# Remembers the JSON body of every fetch the page sends (the page calls the global fetch).
RECORD_REQUESTS = """
window.sentBodies = [];
const fetchBefore = window.fetch;
window.fetch = (url, init) => {
  if (init && init.body) window.sentBodies.push(JSON.parse(init.body));
  return fetchBefore(url, init);
};
"""


def wait(browser: webdriver.Chrome, timeout: float = WAIT) -> WebDriverWait:
    return WebDriverWait(browser, timeout, poll_frequency=0.05)


def model_options(browser: webdriver.Chrome) -> list[str]:
    return [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]


def open_page(browser: webdriver.Chrome, url: str) -> None:
    """Open the chat page and wait until its model list came from the server."""
    browser.get(f"{url}/")
    wait(browser).until(lambda b: model_options(b))


def fill(browser: webdriver.Chrome, **fields: str) -> None:
    """Type into the settings fields (by id, `_` for `-`), opening the settings first."""
    settings = browser.find_element(By.ID, "settings")
    if settings.get_attribute("open") is None:
        settings.find_element(By.TAG_NAME, "summary").click()
    for name, value in fields.items():
        field = browser.find_element(By.ID, name.replace("_", "-"))
        field.clear()
        field.send_keys(value)


def ask(browser: webdriver.Chrome, *keys: str) -> None:
    """Type `keys` into the message box and press Enter."""
    browser.find_element(By.ID, "prompt").send_keys(*keys, Keys.ENTER)


def answers(browser: webdriver.Chrome) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, ".message.assistant")


def wait_for_answers(browser: webdriver.Chrome, count: int) -> WebElement:
    """Wait until the page holds `count` finished answers; the last one."""

    def finished(b: webdriver.Chrome) -> WebElement | bool:
        found = answers(b)
        done = len(found) == count and found[-1].get_attribute("aria-busy") is None
        return found[-1] if done and b.find_element(By.ID, "send").is_enabled() else False

    return wait(browser).until(finished)


def stats_of(answer: WebElement) -> str:
    return answer.find_element(By.CLASS_NAME, "stats").text


def test_the_model_list_comes_from_v1_models(browser: webdriver.Chrome, slow_server: str) -> None:
    open_page(browser, slow_server)
    assert model_options(browser) == ["tiny"]
    assert browser.find_element(By.ID, "model").get_attribute("value") == "tiny"
    assert browser.title == "Kiln chat"
    fill(browser)  # opens the settings: no API key field, this server needs none
    assert browser.find_element(By.ID, "temperature").is_displayed()
    assert not browser.find_element(By.ID, "api-key").is_displayed()


def test_an_answer_streams_in_and_stop_frees_the_request(browser: webdriver.Chrome, slow_server: str) -> None:
    open_page(browser, slow_server)
    # Greedy: the tiny model answers "hi" with ~600 tokens, ~15 s at this server's pace.
    fill(browser, temperature="0", max_tokens="1000")
    cancelled = metric(slow_server, "kiln_requests_total", endpoint="chat", outcome="cancelled")
    ask(browser, "hi")
    content = wait(browser).until(lambda b: b.find_element(By.CSS_SELECTOR, ".message.assistant .content"))

    lengths: list[int] = []

    def grew_four_times(_: Any) -> bool:
        size = len(content.text)
        if size and (not lengths or size > lengths[-1]):
            lengths.append(size)
        return len(lengths) >= 4

    wait(browser).until(grew_four_times)  # tokens arrive one after another, not as one block
    answer = answers(browser)[-1]
    assert answer.get_attribute("aria-busy") == "true"
    wait(browser).until(lambda _: "tokens/s" in stats_of(answer))  # shown while it streams
    assert stats_of(answer).startswith("TTFT ")
    assert metric(slow_server, "kiln_num_requests_running") == 1  # still generating on the server

    browser.find_element(By.ID, "stop").click()
    wait(browser).until(lambda _: stats_of(answer).endswith("stopped"))
    assert browser.find_element(By.ID, "send").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()
    assert content.text  # what arrived stays
    # The server saw the client go: the request ended as `cancelled`, its KV blocks back in the pool.
    assert wait_for(lambda: metric(slow_server, "kiln_num_requests_running") == 0, timeout=WAIT)
    assert wait_for(lambda: metric(slow_server, "kiln_kv_cache_usage_ratio") == 0, timeout=WAIT)
    assert metric(slow_server, "kiln_requests_total", endpoint="chat", outcome="cancelled") == cancelled + 1


def test_the_conversation_carries_its_history_until_a_new_chat(
    browser: webdriver.Chrome, slow_server: str
) -> None:
    open_page(browser, slow_server)
    browser.execute_script(RECORD_REQUESTS)
    fill(browser, system_prompt="Answer briefly.", temperature="0", max_tokens="8")
    system = {"role": "system", "content": "Answer briefly."}

    ask(browser, "first question")
    first = wait_for_answers(browser, 1)
    # Counted from the stream's usage (include_usage), not estimated from chunks.
    assert "· 8 tokens ·" in stats_of(first) and "~" not in stats_of(first)
    assert stats_of(first).endswith("length")
    ask(browser, "second", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "line")  # Shift+Enter: a newline
    wait_for_answers(browser, 2)

    sent = browser.execute_script("return window.sentBodies")
    assert len(sent) == 2
    assert sent[0]["messages"] == [system, {"role": "user", "content": "first question"}]
    history = sent[1]["messages"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    assert history[:2] == sent[0]["messages"]
    assert history[2]["content"]  # the first answer, as it streamed in
    assert history[3] == {"role": "user", "content": "second\nline"}
    for body in sent:
        assert body["model"] == "tiny" and body["temperature"] == 0 and body["max_tokens"] == 8
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}

    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#conversation .message")
    ask(browser, "third")
    wait_for_answers(browser, 1)
    sent = browser.execute_script("return window.sentBodies")
    assert sent[2]["messages"] == [system, {"role": "user", "content": "third"}]


def test_the_api_key_is_asked_for_used_and_kept(browser: webdriver.Chrome, tiny_gqa_dir: Path) -> None:
    proc, url, _log = start_cli_server(tiny_gqa_dir, "--api-keys", "sesame")
    try:
        browser.get(f"{url}/")
        key = browser.find_element(By.ID, "api-key")
        wait(browser).until(lambda _: key.is_displayed())  # /v1/models said 401
        notice = browser.find_element(By.ID, "notice")
        assert "needs an API key" in notice.text
        assert model_options(browser) == []

        key.send_keys("wrong", Keys.TAB)
        wait(browser).until(lambda _: "refused" in notice.text)
        assert model_options(browser) == []
        key.clear()
        key.send_keys("sesame", Keys.TAB)
        wait(browser).until(lambda b: model_options(b) == ["tiny"])
        assert not notice.text

        fill(browser, max_tokens="8")
        ask(browser, "hi")
        answer = wait_for_answers(browser, 1)
        assert not answer.find_elements(By.CSS_SELECTOR, "[role=alert]")
        assert stats_of(answer).startswith("TTFT ")

        assert browser.execute_script("return localStorage.getItem('kiln.apiKey')") == "sesame"
        browser.refresh()
        wait(browser).until(lambda b: model_options(b) == ["tiny"])  # with the kept key
        key = browser.find_element(By.ID, "api-key")
        assert key.get_attribute("value") == "sesame"
        assert not browser.find_element(By.ID, "api-key-field").get_attribute("hidden")
    finally:
        stop_server(proc)


def test_a_reasoning_models_thinking_is_shown_apart(browser: webdriver.Chrome, tiny_gqa_dir: Path) -> None:
    # The tiny model never writes </think>: with the parser, all of its output is reasoning.
    proc, url, _log = start_cli_server(tiny_gqa_dir, "--reasoning-parser", "deepseek_r1")
    try:
        open_page(browser, url)
        browser.execute_script(RECORD_REQUESTS)
        fill(browser, temperature="0", max_tokens="12")
        ask(browser, "hi")
        answer = wait_for_answers(browser, 1)
        thinking = answer.find_element(By.CSS_SELECTOR, "details.thinking")
        assert thinking.find_element(By.TAG_NAME, "summary").text == "Thinking"
        assert thinking.get_attribute("open") is not None  # no answer came: it stays open
        text = browser.execute_script("return arguments[0].querySelector('div').textContent", thinking)
        assert text.strip() and answer.find_element(By.CLASS_NAME, "content").text == ""
        assert stats_of(answer).startswith("TTFT ")  # the thinking counts as the reply's first tokens
        ask(browser, "again")
        wait_for_answers(browser, 2)
        sent = browser.execute_script("return window.sentBodies")
        assert sent[-1]["messages"] == [{"role": "user", "content": "again"}]  # no answer, no history
    finally:
        stop_server(proc)


MARKDOWN = """# Title

Some **bold** text and a [link](https://example.com).

```python
def add(a, b):
    return a + b
```

<script>window.pwned = 1</script>
<img src="missing.png" onerror="window.pwned = 2">

A [bad link](javascript:window.pwned=3).
"""


def test_markdown_is_rendered_highlighted_and_sanitized(browser: webdriver.Chrome, slow_server: str) -> None:
    open_page(browser, slow_server)
    html = browser.execute_script(
        "const div = document.createElement('div'); document.body.append(div);"
        "kilnChat.renderMarkdown(div, arguments[0]); return div.innerHTML;",
        MARKDOWN,
    )
    rendered = browser.find_element(By.CSS_SELECTOR, "body > div:last-child")
    assert rendered.find_element(By.TAG_NAME, "h1").text == "Title"
    assert rendered.find_element(By.TAG_NAME, "strong").text == "bold"
    code = rendered.find_element(By.CSS_SELECTOR, "pre code.language-python")
    assert "hljs" in code.get_attribute("class").split()
    keywords = [k.text for k in code.find_elements(By.CLASS_NAME, "hljs-keyword")]
    assert keywords == ["def", "return"]
    link = rendered.find_element(By.CSS_SELECTOR, "a[href='https://example.com']")
    assert link.get_attribute("target") == "_blank" and link.get_attribute("rel") == "noopener noreferrer"
    # Sanitized: no script, no event handler, no javascript: URL; nothing ran.
    assert "<script" not in html and "onerror" not in html
    assert rendered.find_element(By.LINK_TEXT, "bad link").get_attribute("href") is None
    assert rendered.find_element(By.TAG_NAME, "img").get_attribute("src").endswith("missing.png")
    assert browser.execute_script("return window.pwned === undefined")


def test_a_phone_sized_window_has_no_horizontal_overflow(browser: webdriver.Chrome, slow_server: str) -> None:
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 375, "height": 740, "deviceScaleFactor": 2, "mobile": True},
    )
    open_page(browser, slow_server)
    assert browser.execute_script("return window.innerWidth") == 375
    fill(browser, max_tokens="40", system_prompt="Be brief.")
    ask(browser, "hi")
    answer = wait_for_answers(browser, 1)
    # Long unbroken text and a long code line, as models write them.
    browser.execute_script(
        "kilnChat.renderMarkdown(arguments[0], arguments[1])",
        answer.find_element(By.CLASS_NAME, "content"),
        "x" * 300 + "\n\n```\n" + "y = 1; " * 80 + "\n```",
    )
    widths = browser.execute_script(
        "return [document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]"
    )
    assert widths[0] <= widths[2] and widths[1] <= widths[2], widths
    for control in browser.find_elements(By.CSS_SELECTOR, "input, select, textarea, button, summary"):
        if control.is_displayed():
            box = control.rect
            assert box["x"] >= 0 and box["x"] + box["width"] <= 375, (control.get_attribute("id"), box)


def test_every_control_has_an_accessible_name(browser: webdriver.Chrome, slow_server: str) -> None:
    open_page(browser, slow_server)
    fill(browser)  # opens the settings
    browser.execute_script("document.getElementById('api-key-field').hidden = false")
    controls = browser.find_elements(By.CSS_SELECTOR, "input, select, textarea, button")
    names = {control.get_attribute("id"): control.accessible_name for control in controls}
    assert names == {
        "model": "Model",
        "new-chat": "New chat",
        "system-prompt": "System prompt",
        "temperature": "Temperature",
        "max-tokens": "Max tokens",
        "api-key": "API key",
        "prompt": "Message",
        "send": "Send",
        "stop": "Stop",
    }
    conversation = browser.find_element(By.ID, "conversation")
    assert conversation.get_attribute("aria-live") == "polite"
    assert conversation.aria_role == "log"


def test_the_page_and_the_api_docs_load_nothing_from_elsewhere(
    browser: webdriver.Chrome, slow_server: str
) -> None:
    loaded = "return performance.getEntriesByType('resource').map((entry) => entry.name)"
    open_page(browser, slow_server)
    page_urls = browser.execute_script(loaded)
    assert any(u.endswith("/static/vendor/highlight.min.js") for u in page_urls)
    assert all(u.startswith(f"{slow_server}/") for u in page_urls), page_urls

    browser.get(f"{slow_server}/docs")  # Swagger UI renders the API from /openapi.json
    wait(browser).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) >= 5)
    assert "/v1/chat/completions" in browser.find_element(By.ID, "swagger-ui").text
    docs_urls = browser.execute_script(loaded)
    assert any(u.endswith("/openapi.json") for u in docs_urls)
    assert all(u.startswith(f"{slow_server}/") for u in docs_urls), docs_urls
