"""The playground page at `/`, driven in headless Chromium: type a prompt, see streamed text appear.

Runs a real server (uvicorn on a free loopback port) with a tiny random model and a character
tokenizer, and a real browser through selenium + chromedriver (Debian's `chromium` and
`chromium-driver` packages; `.ci/run` installs them where apt is available). Skipped, with the
reason, only when no Chromium or chromedriver can be found.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the [dev] extra")
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from gpt3zh.config import GPTConfig
from gpt3zh.generation import generate
from gpt3zh.model import GPT
from gpt3zh.serve import ServeConfig, create_app
from gpt3zh.tokenizer import train_char_tokenizer
from serving import BackgroundServer

CHARS = "".join(chr(i) for i in range(32, 127)) + "中国的首都是春眠不觉晓"
TOK = train_char_tokenizer([CHARS])


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name) or (name if os.path.isfile(name) and os.access(name, os.X_OK) else None)
        if path:
            return path
    return None


CHROMIUM = _find(os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome")
DRIVER = _find(os.environ.get("CHROMEDRIVER", ""), "chromedriver", "/usr/lib/chromium/chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="no Chromium/chromedriver found (apt-get install -y chromium chromium-driver, or set CHROMIUM and "
           f"CHROMEDRIVER); found chromium={CHROMIUM}, chromedriver={DRIVER}",
)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=TOK.vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=256,
                    dropout=0.0, attn_dropout=0.0, init_std=0.3)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _set_slider(driver, name: str, value) -> None:
    driver.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input'));", name, str(value))


def test_playground_streams_the_completion_into_the_page(model, browser):
    prompt = "中国的首都是"
    max_tokens = 120
    ids = TOK.encode(prompt)
    # The reference is a copy: the served model's KV cache belongs to the engine.
    out = generate(copy.deepcopy(model), [ids], max_new_tokens=max_tokens, eos_token_id=1)[0][len(ids):]
    want = TOK.decode(out)
    app = create_app(copy.deepcopy(model), TOK, ServeConfig(max_batch=2), model_id="tiny-browser")
    with BackgroundServer(app) as srv:
        browser.get(srv.url + "/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.05)
        wait.until(lambda d: d.find_element(By.ID, "model-id").text == "tiny-browser")
        box = browser.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(prompt)
        _set_slider(browser, "max_tokens", max_tokens)
        _set_slider(browser, "temperature", 0)  # greedy: the page must show exactly gpt3zh.generate's text
        assert browser.find_element(By.ID, "max_tokens-v").text == str(max_tokens)
        # Record the output's length each time the page changes it (once per task, i.e. per network read).
        browser.execute_script(
            "window.lengths = [];"
            "new MutationObserver(() => { const g = document.getElementById('generated');"
            "  window.lengths.push(g ? g.textContent.length : 0); })"
            ".observe(document.getElementById('out'), {childList: true, subtree: true, characterData: true});")
        browser.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))

        status = browser.find_element(By.ID, "status").text
        assert status.startswith("done (") and f": {len(out)} tokens" in status, status
        assert browser.execute_script("return document.getElementById('generated').textContent") == want
        assert browser.find_element(By.ID, "out").text.startswith(prompt)  # the prompt, then the output
        # Streamed: the text grew through several partial lengths before it was complete.
        lengths = browser.execute_script("return window.lengths")
        partial = {n for n in lengths if 0 < n < len(want)}
        assert len(partial) >= 3, lengths
        print(f"{len(want)} characters arrived in {len(lengths)} page updates")
