"""The web chat page in a real headless browser (Debian's chromium driven by Playwright): a typed message
gets a streamed answer equal to the engine's, Stop ends a long answer and its row leaves the server's
batch, the conversation is multi-turn, the page loads nothing from outside, and the Markdown renderer
turns model text into code blocks without ever letting it inject markup."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
import torch
from playwright.sync_api import sync_playwright

from _serve_helpers import LiveServer, load_engine, make_model_dir
from gptlab.chat import render_for_completion
from gptlab.infer.sampling import SamplingParams
from gptlab.serve.app import ServeConfig, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model decodes faster on one thread of the 2 shared cores
    yield load_engine(make_model_dir(tmp_path_factory.mktemp("web") / "tiny"))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(engine):
    live = LiveServer(create_app(engine, ServeConfig(model_name="tiny", max_batch=4)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    page = context.new_page()
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server.url) else None)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    yield page
    assert outside == []  # self-contained: nothing is fetched from anywhere but our server
    context.close()


def configure(page, temperature="0", max_tokens="20"):
    page.click("summary")
    page.fill("#temperature", temperature)
    page.fill("#max_tokens", max_tokens)


def expected(engine, messages, n):
    ids = render_for_completion(engine.tokenizer, messages)
    return engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=n))[0].text


def test_streamed_answer_and_multi_turn(page, engine):
    configure(page)
    page.fill("#input", "def dedent(text):")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=30_000)
    first = [{"role": "user", "content": "def dedent(text):"}]
    answer1 = expected(engine, first, 20)
    assert page.get_attribute(".msg.assistant", "data-raw") == answer1
    assert page.inner_text(".msg.user") == "def dedent(text):"
    # a second turn sends the whole conversation
    page.fill("#input", "and then?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-done='1']", timeout=30_000)
    second = [*first, {"role": "assistant", "content": answer1}, {"role": "user", "content": "and then?"}]
    assert page.get_attribute(".msg.assistant:nth-of-type(4)", "data-raw") == expected(engine, second, 20)
    # the conversation survives a reload; New chat clears it
    page.reload()
    page.wait_for_selector(".msg.assistant:nth-of-type(4)")
    page.click("#new")
    assert page.locator(".msg").count() == 0


def test_stop_button_ends_a_long_answer(page, server):
    configure(page, temperature="0", max_tokens="1900")  # greedy: known never to stop before 1900 tokens
    before = httpx.get(server.url + "/health").json()["generated_tokens"]
    page.fill("#input", "tell me a long story")
    page.press("#input", "Enter")
    # the answer appears piece by piece while the request is still running; Stop is pressed from inside
    # the page the moment that is seen (Playwright's own click waits for layout to settle, and this tiny
    # model can finish 1900 tokens in a few seconds)
    stopped_at = page.wait_for_function("""() => {
        const el = document.querySelector('.msg.assistant'), stop = document.getElementById('stop');
        const raw = (el && el.dataset.raw) || '';
        if (raw.length > 30 && !el.dataset.done && !stop.disabled && document.getElementById('send').disabled) {
            stop.click();
            return raw.length;
        }
        return false;
    }""", timeout=30_000).json_value()
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=10_000)
    assert "(stopped)" in page.inner_text(".msg.assistant")
    assert stopped_at <= len(page.get_attribute(".msg.assistant", "data-raw")) < 1900
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    # aborting the fetch closed the connection: the server dropped the row before its 1900 tokens
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["running_rows"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["generated_tokens"] - before < 1900


def test_markdown_renderer_is_safe_and_renders_code(page):
    html = page.evaluate("""renderMarkdown(
        "# Title\\n**bold** and `x < y` and [ok](https://example.org) [bad](javascript:alert(1))\\n"
        + "<img src=x onerror=alert(1)>\\n- one\\n- two\\n```python\\nif a < b:\\n    print('<b>')\\n```\\nafter")""")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html
    assert "<code>x &lt; y</code>" in html
    assert '<a href="https://example.org" rel="noopener noreferrer" target="_blank">ok</a>' in html
    assert "javascript:" not in html.split("[bad]")[0] and 'href="javascript' not in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert '<pre><code class="language-python">if a &lt; b:\n    print(&#39;&lt;b&gt;&#39;)</code></pre>' in html
    assert html.endswith("<p>after</p>")
    # in the live page, a model answer with markup shows as text: no element is created from it
    page.evaluate("""() => { const el = addMessage('assistant', '<script>window.pwned = 1</script><b>x</b>'); }""")
    assert page.evaluate("window.pwned") is None
    assert page.locator(".msg.assistant b").count() == 0


def test_empty_sampling_settings_leave_them_to_the_server(page):
    """Temperature and top-p start empty and are then not sent, so the server picks the model's own
    settings (generation_config.json) or its chat defaults; a value typed in is sent."""
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.click("summary")
    assert page.input_value("#temperature") == "" and page.input_value("#top_p") == ""
    page.fill("#max_tokens", "3")
    for text in ("first", "second"):
        page.fill("#input", text)
        page.press("#input", "Enter")
        page.wait_for_selector(f".msg.assistant:nth-of-type({2 * len(bodies)})[data-done='1']", timeout=30_000)
        page.fill("#temperature", "0.5")
    assert [("temperature" in b, "top_p" in b, b["max_tokens"]) for b in bodies] == [(False, False, 3),
                                                                                  (True, False, 3)]
    assert bodies[1]["temperature"] == 0.5
