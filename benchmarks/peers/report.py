"""The markdown report of a peer comparison: one table, metrics down, peers across, then how it was measured."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Row = tuple[str, Callable[[dict[str, Any]], str]]


def _get(peer: dict[str, Any], *path: str) -> Any:
    value: Any = peer
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, int | float) else str(value)


def _field(*path: str, digits: int = 0) -> Callable[[dict[str, Any]], str]:
    return lambda peer: _fmt(_get(peer, *path), digits)


def _trio(phase: str) -> Callable[[dict[str, Any]], str]:
    return lambda peer: " / ".join(
        _fmt(_get(peer, "phases", phase, k)) for k in ("itl_median_ms", "itl_p90_ms", "itl_p99_ms")
    )


def _pair(phase: str) -> Callable[[dict[str, Any]], str]:
    return lambda peer: " / ".join(_fmt(_get(peer, "phases", phase, k)) for k in ("ttft_p50_ms", "ttft_p99_ms"))


def _errors(peer: dict[str, Any]) -> str:
    phases = peer.get("phases") or {}
    total = sum(len(p.get("errors", [])) for p in phases.values() if isinstance(p, dict))
    total += sum(len(_get(phases, "prefix_500", k, "errors") or []) for k in ("first", "second"))
    return str(total) if phases else "–"


def _rows(concurrencies: list[int]) -> list[Row]:
    rows: list[Row] = [
        ("status", lambda p: p["status"]),
        ("start-up until ready (s)", _field("start_s", digits=1)),
        ("TTFT, 1 user, ~100-token prompt, median (ms)", _field("phases", "c1_100", "ttft_median_ms")),
        ("TTFT, 1 user, ~500-token prompt, median (ms)", _field("phases", "c1_500", "ttft_median_ms")),
        (
            "TTFT, 1 user, ~500-token prompt whose 500-token prefix was just served, median (ms)",
            _field("phases", "prefix_500", "second", "ttft_median_ms"),
        ),
        ("inter-token latency, 1 user, median / p90 / p99 (ms)", _trio("c1_100")),
        ("chunks/s of one stream, median", _field("phases", "c1_100", "decode_chunks_per_s", digits=1)),
        ("output tokens per chunk", _field("phases", "c1_100", "tokens_per_chunk", digits=2)),
    ]
    for c in concurrencies:
        rows.append((f"TTFT, {c} users, p50 / p99 (ms)", _pair(f"c{c}")))
        rows.append(
            (f"output tokens/s, {c} users, all streams", _field("phases", f"c{c}", "output_tokens_per_s", digits=1))
        )
    rows += [
        ("peak RSS, VmHWM summed over the server's processes (MiB)", _field("peak_rss_mb")),
        ("failed requests", _errors),
    ]
    return rows


def markdown(meta: dict[str, Any], peers: list[dict[str, Any]]) -> str:
    concurrencies = [c for c, _ in meta["plan"]["batch_requests"]]
    lines = [
        f"# Peer comparison{' (quick smoke run)' if meta['quick'] else ''}: {meta['date']}",
        "",
        f"SmolLM2-135M-Instruct, greedy, streamed over OpenAI-compatible `/v1/chat/completions`, one client, "
        f"one server at a time. Machine: {meta['cpu']}, {meta['cores']} cores; {meta['threads']} threads per peer; "
        f"torch {meta['torch_blink_venv']} (blink's venv). Command:",
        "",
        f"    {meta['command']}",
        "",
        "| metric | " + " | ".join(p["peer"] for p in peers) + " |",
        "|---|" + "---|" * len(peers),
    ]
    for label, cell in _rows(concurrencies):
        lines.append(f"| {label} | " + " | ".join(cell(p).replace("|", "\\|") for p in peers) + " |")
    plan = meta["plan"]
    lines += [
        "",
        f"Requests: {plan['rounds']} of each one-user kind; the one-user ~100-token requests generate up to "
        f"{plan['itl_tokens']} tokens, the ~500-token ones {plan['ttft_tokens']}; "
        + ", ".join(f"{n} requests at {c} users" for c, n in plan["batch_requests"])
        + f", up to {plan['batch_tokens']} tokens each. Prompt lengths (tokens, chat template included): "
        f"{meta['prompt_tokens']}. TTFT: request sent until the first chunk with text. Inter-token latency: gaps "
        "between chunks with text (a peer that sends more than one token per chunk shows it in 'output tokens per "
        "chunk'). Output tokens: the server's usage count when it sends one, else the text re-tokenized. p99 of a "
        "few dozen samples is close to the maximum.",
        "",
        "Peers:",
        "",
    ]
    for p in peers:
        lines.append(
            f"- **{p['peer']}**: {p['describe']}; {p.get('version', '')}. "
            f"Load average before: {', '.join(f'{x:.2f}' for x in p['load_avg_before'])}."
            + (f" Command: `{p['command']}`" if "command" in p else "")
        )
    answers = [(p["peer"], _get(p, "phases", "c1_100", "first_answer")) for p in peers]
    if any(a for _, a in answers):
        lines += ["", "Greedy answer to the first one-user prompt (first 80 characters), to compare outputs:", ""]
        lines += [f"- {name}: `{a[:80]!r}`" for name, a in answers if a]
    return "\n".join(lines) + "\n"
