"""The web client at `/` in a real browser (Debian's chromium through Playwright) against a real `blink serve`: a
person types, presses Enter, stops answers, adds documents, loses the connection and mistypes the key."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, Page

from blink.gateway.keys import KeyFile
from tests.e2e.browser import chromium
from tests.e2e.conftest import ProxyThread, Server, serving

pytestmark = pytest.mark.slow

ANSWERED = "#messages li.assistant[data-status]:not([data-status=in_progress])"
NOTES = (  # a fact no model knows: an answer that has it quotes the document
    "Notes from the lab meeting.\n\n"
    "The password for the blue cabinet is ZEBRA-4417.\n\n"
    "The next meeting is on Tuesday, in the small room."
)
LONG = "Write a long story about a dragon who learns to bake bread, with many details."


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as (_, b):
        yield b


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert errors == [], f"the page raised: {errors}"


def open_page(page: Page, base: str, **settings: str) -> None:
    """Load the client from `base`, wait until it is connected, then fill in settings (ids of index.html's inputs)."""
    page.goto(base + "/")
    page.wait_for_selector("#status[data-status=open]")
    for field, value in {"temperature": "0", "cache": "off", **settings}.items():
        if field in ("cache", "preload"):
            page.set_checked(f"#{field}", value == "on")
        else:
            page.fill(f"#{field.replace('_', '-')}", value)
    page.click("#connect")  # connected with the same key: applies the settings (session.update)
    page.wait_for_selector("#status[data-status=open]")


def ask(page: Page, question: str, *, delay_ms: float = 0) -> None:
    """Type `question` into the composer key by key (`delay_ms` between keys) and press Enter."""
    page.click("#input")
    page.keyboard.type(question, delay=delay_ms)
    page.keyboard.press("Enter")


def last_answer(page: Page, n: int = 1) -> dict[str, str]:
    """The n-th assistant message's text, status and data attributes, once it has ended."""
    selector = f"#messages li.assistant >> nth={n - 1}"
    page.wait_for_selector(f"{ANSWERED} >> nth={n - 1}", timeout=60_000)
    li = page.locator(selector)
    out = li.evaluate("li => ({...li.dataset})")
    out["text"] = li.locator(".text").inner_text()
    out["timings"] = li.locator(".timings").inner_text()
    return out  # type: ignore[no-any-return]


def preloaded_tokens(server: Server) -> int:
    return sum(r["background_prefill_tokens"] for r in server.readyz()["replicas"])


def test_drafts_reach_the_server_and_enter_streams_the_answer(server: Server, page: Page, tmp_path: Path) -> None:
    open_page(page, server.base, max_tokens="24")
    before = preloaded_tokens(server)
    page.click("#input")
    page.keyboard.type("Name three colours of the rainbow", delay=40)  # one input_text.draft per key
    page.wait_for_function(  # the drafts reached the server: it pre-loaded their prompt
        "([url, before]) => fetch(url).then(r => r.json()).then(s => "
        "s.replicas.reduce((n, r) => n + r.background_prefill_tokens, 0) > before)",
        arg=[f"{server.base}/readyz", before],
    )
    page.keyboard.type(".")
    page.keyboard.press("Enter")
    answer = last_answer(page)
    assert answer["status"] in ("completed", "incomplete")
    assert int(answer["deltas"]) >= 2 and answer["text"].strip()  # streamed, delta by delta
    assert float(answer["firstTokenMs"]) > 0 and "first token" in answer["timings"]
    assert "pre-loaded" in answer["timings"] and re.search(r"\d+ of \d+ prompt tokens cached", answer["timings"])
    assert answer["verified"] == "true"  # what the page shows is the server's whole text
    assert page.input_value("#input") == ""
    assert page.locator("#chart rect").count() == 1 and "Last 1 answers" in page.inner_text("#chart-desc")
    shot = tmp_path / "web-client.png"  # the page answering
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_stop_and_esc_cancel_and_the_conversation_goes_on(server: Server, page: Page) -> None:
    open_page(page, server.base, max_tokens="400")
    for n, stop in ((1, lambda: page.keyboard.press("Escape")), (2, lambda: page.click("#stop"))):
        ask(page, LONG)
        page.wait_for_selector(f"#messages li.assistant[data-deltas] >> nth={n - 1}")
        stop()
        answer = last_answer(page, n)
        assert answer["status"] == "cancelled", answer
        assert page.is_disabled("#stop")
    page.fill("#max-tokens", "16")
    page.dispatch_event("#max-tokens", "change")
    ask(page, "Say hello.")
    answer = last_answer(page, 3)
    assert answer["status"] in ("completed", "incomplete") and answer["text"].strip()
    assert int(page.locator("#messages li.user").count()) == 3


def test_a_repeated_question_is_answered_from_the_semantic_cache(server: Server, page: Page) -> None:
    answers = []
    for _ in range(2):  # two conversations (the cache answers a conversation's first question only)
        open_page(page, server.base, max_tokens="64", cache="on", instructions="Answer in one short sentence.")
        ask(page, "Which planet is known as the red planet?")
        answers.append(last_answer(page))
    first, second = answers
    assert first["status"] == "completed" and first["kind"] != "cache", first  # only complete answers are cached
    assert second["kind"] == "cache" and second["text"] == first["text"]
    assert re.search(r"semantic cache hit \(similarity (1\.000|0\.9\d\d)\)", second["timings"]), second["timings"]


def test_an_uploaded_document_is_chunked_opened_and_quoted(server: Server, page: Page, tmp_path: Path) -> None:
    open_page(page, server.base, max_tokens="48", instructions="Answer from the documents.")
    upload = tmp_path / "lab-notes.txt"
    upload.write_text(NOTES)
    page.click("#documents-panel summary")
    page.set_input_files("#doc-file", str(upload))
    page.click("#add-doc")
    item = page.locator("#documents li[data-document-id]", has_text="lab-notes.txt")
    item.locator("details ol li").first.wait_for()  # its chunks, as the server split them
    chunks = item.locator("details ol li").all_inner_texts()
    assert len(chunks) >= 1 and "ZEBRA-4417" in " ".join(chunks)
    assert item.locator("input[type=checkbox]").is_checked()  # opened for this session
    doc_id = item.get_attribute("data-document-id")
    try:
        ask(page, "What is the password for the blue cabinet?")
        answer = last_answer(page)
        assert "ZEBRA-4417" in answer["text"], (answer["text"], answer["timings"])
    finally:
        assert httpx.delete(f"{server.base}/v1/documents/{doc_id}", timeout=10).status_code == 200


def test_a_dropped_connection_resumes_the_answer(server: Server, page: Page) -> None:
    proxy = ProxyThread(server.port)  # the network between the browser and the server
    try:
        open_page(page, f"http://127.0.0.1:{proxy.proxy.port}", max_tokens="160")
        ask(page, LONG)
        page.wait_for_function("() => Number(document.querySelector('#messages li.assistant').dataset.deltas) >= 3")
        proxy.cut("reset")  # the network drops: the WebSocket closes mid-answer, and reconnecting fails for now
        page.wait_for_selector("#status[data-status=reconnecting]")
        proxy.restore()
        answer = last_answer(page)
        assert answer["status"] in ("completed", "incomplete"), answer
        assert "gap" not in answer and answer["verified"] == "true"  # nothing lost, nothing repeated
        assert page.get_attribute("#status", "data-status") == "open"
        assert int(page.get_attribute("#status", "data-reconnects") or 0) >= 1
    finally:
        proxy.close()


def test_a_wrong_key_says_so_and_the_right_one_works(tmp_path: Path, page: Page) -> None:
    keys = KeyFile(tmp_path / "keys.json")
    _, key = keys.add("alice")
    with serving(tmp_path / "serve.log", "--api-keys", str(keys.path)) as srv:
        page.goto(srv.base + "/")
        notice = page.locator("#notice")
        notice.wait_for()
        assert "API key was refused" in notice.inner_text() and "Settings" in notice.inner_text()
        page.fill("#api-key", "sk-not-a-key")
        page.click("#connect")
        page.wait_for_function("() => document.querySelector('#notice').textContent.includes('refused')")
        assert page.get_attribute("#status", "data-status") == "closed"
        page.fill("#api-key", key)
        page.click("#connect")
        page.wait_for_selector("#status[data-status=open]")
        assert page.locator("#notice").is_hidden()
        page.fill("#max-tokens", "8")
        page.dispatch_event("#max-tokens", "change")
        ask(page, "Hi!")
        assert last_answer(page)["status"] in ("completed", "incomplete")


def test_the_page_has_no_serious_accessibility_violations(server: Server, page: Page) -> None:
    open_page(page, server.base, max_tokens="8")
    ask(page, "Hello!")
    last_answer(page)
    page.click("#documents-panel summary")
    results = Axe().run(page)
    serious = [v for v in results.response["violations"] if v["impact"] in ("serious", "critical")]
    assert serious == [], results.generate_report()


def test_the_page_fits_a_phone(server: Server, browser: Browser) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.goto(server.base + "/")
        page.wait_for_selector("#status[data-status=open]")
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390  # nothing wider than the screen
        page.fill("#max-tokens", "8")
        page.dispatch_event("#max-tokens", "change")
        page.tap("#input")
        page.keyboard.type("Hi")
        page.tap("#send")
        page.wait_for_selector(ANSWERED, timeout=60_000)
    finally:
        context.close()
