"""Enter -> first token in the browser: blink's own web client (src/blink/web/, served at `/`) in Debian's chromium,
a simulated person typing questions key by key (timing, typos and the pause before Enter from
src/blink/bench/typing.py's cited keystroke model), once with "Pre-load while I type" on (a draft per keystroke:
pre-loading and pre-decode) and once off (the page sends only the submit), question by question in turn, on one
server, so both arms see the same machine at the same time.

What is measured is the page's own figure: performance.now() in the Enter keydown handler to the first token
inserted into the page (`data-first-token-ms`), and to the next animation frame after it (`data-first-paint-ms`,
when the browser paints it). Each arm is one conversation of --questions questions (its history grows alike).

  python benchmarks/browser_typing.py [--questions 20] [--max-tokens 32] [--seed 7] [--name browser-typing]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from playwright.sync_api import Page

from benchmarks.common import machine, write_report
from blink.bench.typing import QUESTIONS, Question, Typist
from tests.e2e.browser import chromium
from tests.e2e.conftest import Server

ANSWER = "#messages li.assistant >> nth={n}"


def press_keys(page: Page, question: Question) -> None:
    """Replay the question's keys in the composer (each key's draft from the previous one: a typed character or a
    Backspace), its pause, then Enter."""
    shown = ""
    for key in (*question.keys, *question.revision):
        time.sleep(key.delay_s)
        if key.text == shown + key.text[len(shown) :] and len(key.text) == len(shown) + 1:
            page.keyboard.type(key.text[-1])
        elif key.text == shown[:-1]:
            page.keyboard.press("Backspace")
        elif key.text != shown:
            page.fill("#input", key.text)
        shown = key.text
        if key is question.keys[-1]:
            time.sleep(question.pause_s)
    page.keyboard.press("Enter")


def open_arm(browser: Any, base: str, preload: bool, max_tokens: int) -> Page:
    page: Page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    page.goto(base + "/")
    page.wait_for_selector("#status[data-status=open]")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))
    page.set_checked("#cache", False)  # the model's path in both arms, not the semantic cache
    page.set_checked("#preload", preload)
    page.click("#connect")
    page.click("#input")
    return page


def answer(page: Page, n: int) -> dict[str, Any]:
    li = page.locator(ANSWER.format(n=n))
    page.wait_for_selector(f"#messages li.assistant[data-kind] >> nth={n}", timeout=120_000)
    page.wait_for_function(f"() => document.querySelectorAll('#messages li.assistant')[{n}].dataset.firstPaintMs")
    data: dict[str, Any] = li.evaluate("li => ({...li.dataset})")
    return {
        "shown_ms": float(data["firstTokenMs"]),
        "painted_ms": float(data["firstPaintMs"]),
        "kind": data["kind"],
        "server_ttft_ms": float(data.get("serverTtftMs", "nan")),
        "status": data["status"],
    }


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    shown, painted = [r["shown_ms"] for r in rows], [r["painted_ms"] for r in rows]
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("predecoded", "preloaded", "cold", "cache")}
    return {
        "shown_p50_ms": statistics.median(shown),
        "shown_p90_ms": quantile(shown, 0.9),
        "painted_p50_ms": statistics.median(painted),
        "painted_p90_ms": quantile(painted, 0.9),
        "server_ttft_p50_ms": statistics.median(r["server_ttft_ms"] for r in rows),
        "kinds": kinds,
    }


def report(args: argparse.Namespace, on: dict[str, Any], off: dict[str, Any], browser: str, iki_ms: float) -> str:
    def row(name: str, s: dict[str, Any]) -> str:
        k = s["kinds"]
        return (
            f"| {name} | {s['shown_p50_ms']:.1f} | {s['shown_p90_ms']:.1f} | {s['painted_p50_ms']:.1f} | "
            f"{s['painted_p90_ms']:.1f} | {s['server_ttft_p50_ms']:.1f} | {k['predecoded']} / {k['preloaded']} / "
            f"{k['cold']} |"
        )

    ratio = on["shown_p50_ms"] / off["shown_p50_ms"]
    painted = on["painted_p50_ms"] / off["painted_p50_ms"]
    return "\n".join(
        [
            "# Enter -> first token in the browser: pre-loading on vs off",
            "",
            f"{machine()} {browser} (headless), Playwright for Python; server and browser on this machine.",
            f"{args.questions} typed questions per arm, taken in turn (one conversation each), temperature 0, "
            f"max {args.max_tokens} tokens, semantic cache off; typist seed {args.seed}: mean inter-key interval "
            f"{iki_ms:.0f} ms, typos corrected with Backspace, pause before Enter per the keystroke model.",
            "",
            "| pre-loading | shown p50 ms | shown p90 ms | painted p50 ms | painted p90 ms | server's own p50 ms |"
            " answers pre-decoded / pre-loaded / cold |",
            "|---|---|---|---|---|---|---|",
            row("on", on),
            row("off", off),
            "",
            f"on / off, p50: **{ratio:.3f}x** shown, {painted:.3f}x painted (targets: on <= 100 ms p50, <= 0.25x).",
            "",
            "shown: Enter keydown to the first token inserted into the page; painted: to the next animation frame; "
            "server's own: response.done's timings.ttft_ms (response.create received -> first token sent).",
            "",
            "    python benchmarks/browser_typing.py " + " ".join(sys.argv[1:]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--name", default="browser-typing")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--screenshot", type=Path, help="save the pre-loading page, answered, here (PNG)")
    args = parser.parse_args()
    typist = Typist(args.seed)
    questions = [typist.question(QUESTIONS[i % len(QUESTIONS)]) for i in range(args.questions)]
    srv = Server(Path(tempfile.mkdtemp()) / "serve.log")
    try:
        srv.wait_ready()
        with chromium() as (_, browser):
            arms = {"on": open_arm(browser, srv.base, True, args.max_tokens)}
            arms["off"] = open_arm(browser, srv.base, False, args.max_tokens)
            rows: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
            for n, question in enumerate(questions):
                for name, page in arms.items():
                    press_keys(page, question)
                    rows[name].append(answer(page, n))
                    time.sleep(question.read_s / 4)
                print(n, {k: (v[-1]["shown_ms"], v[-1]["kind"]) for k, v in rows.items()}, flush=True)
            if args.screenshot:
                arms["on"].screenshot(path=str(args.screenshot))
            on, off = summary(rows["on"]), summary(rows["off"])
            markdown = report(args, on, off, f"Chromium {browser.version}", typist.iki_s * 1000)
        data = {"on": on, "off": off, "rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}
        write_report(args.out, args.name, markdown, data)
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
