"""Screenshot of the chat page mid-conversation, for the README: docs/images/chat-page.png.

    kiln serve &                                   # the default model, SmolLM2-135M-Instruct
    python scripts/chat_page_screenshot.py http://127.0.0.1:8000 docs/images/chat-page.png

Headless Chromium (Debian's `chromium` and `chromium-driver`) at 1280x800: one exchange, then a second
question, shot while its answer streams (once its code block has begun). Greedy (temperature 0), so the
same model gives the same shot.
"""

from __future__ import annotations

import shutil
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

QUESTIONS = ("What is the capital of France?", "Write a Python function that reverses a string.")


def main(url: str, out: str) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--hide-scrollbars"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        browser.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
        )
        wait = WebDriverWait(browser, 120, poll_frequency=0.05)
        browser.get(f"{url}/")
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
        summary = browser.find_element(By.CSS_SELECTOR, "#settings summary")
        summary.click()
        browser.find_element(By.ID, "temperature").send_keys("0")
        summary.click()
        prompt = browser.find_element(By.ID, "prompt")
        prompt.send_keys(QUESTIONS[0], Keys.ENTER)
        wait.until(lambda b: b.find_element(By.ID, "send").is_enabled())
        prompt.send_keys(QUESTIONS[1], Keys.ENTER)
        # Mid-answer: the code block is whole and the text after it has begun (read in the page: each
        # render replaces the answer's elements).
        wait.until(lambda b: b.execute_script("return document.querySelector('.content pre + p') !== null"))
        browser.save_screenshot(out)
    finally:
        browser.quit()


if __name__ == "__main__":
    main(sys.argv[1].rstrip("/"), sys.argv[2])
