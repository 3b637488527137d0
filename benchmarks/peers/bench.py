"""`blink bench` against blink and llama.cpp's `llama-server` on the same model, in one side-by-side report.

Not run in CI. Needs llama-server built (benchmarks/peers/setup.sh llamaserver). Starts both servers as run.py
does (servers.py: same GGUF, same threads; llama-server with -np 8 continuous batching), waits until both are
ready, runs one `blink bench` over SSE for both (blink first, then llama-server with the same sessions; the
server not being measured sits idle: the share of a core each takes when idle is measured first and printed),
then stops them:

    .venv/bin/python benchmarks/peers/bench.py [--threads 2] [--port 18200] [-- BLINK BENCH FLAGS]

By default: a 60 s run per server, arrivals from the Mooncake conversation trace at 0.1x, written to
benchmarks/results/bench-blink-vs-llamacpp.{md,html,json}. Flags after `--` come after these (and after --url,
--url2, --protocol sse and the labels), so they override them: `-- --protocol ws --protocol2 sse` drives blink
over its WebSocket instead.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.peers.servers import PEERS, Env, Server, _tree, install_problem

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
IDLE_PROBE_S = 10.0  # the server not being measured sits idle: how much CPU does that take?
TRACE = REPO.parent / "shared/data/traces/conversation_trace.jsonl"
DEFAULT_BENCH = [
    "--duration-s", "60", "--trace", str(TRACE), "--time-scale", "0.1",
    "--out", str(REPO / "benchmarks/results"), "--name", "bench-blink-vs-llamacpp",
]  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process tree under `pid`, so far."""
    ticks = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def idle_cpu(pids: list[int], seconds: float) -> list[float]:
    """The share of one core each process tree used over `seconds` (call it while they are idle)."""
    before = [cpu_seconds(p) for p in pids]
    time.sleep(seconds)
    return [(cpu_seconds(p) - b) / seconds for p, b in zip(pids, before, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="compute threads of each server")
    parser.add_argument("--port", type=int, default=18200, help="blink's port; llama-server gets the next")
    parser.add_argument("--blink-bin", type=Path, default=REPO / ".venv/bin/blink")
    parser.add_argument("bench", nargs=argparse.REMAINDER, help="flags for blink bench, after --")
    args = parser.parse_args()
    bench_flags = DEFAULT_BENCH + [f for f in args.bench if f != "--"]  # the later of two same flags wins

    from blink.models import registry

    gguf = registry.get("smollm2-135m-instruct").locate()
    env = Env(REPO, HERE / ".venvs", gguf, HERE / ".cache/smollm2-135m-instruct-hf", args.threads, args.blink_bin)
    peers = [PEERS["blink"], PEERS["llamaserver"]]
    for peer in peers:
        if (problem := install_problem(peer, env)) is not None:
            sys.exit(f"{peer.name}: {problem}")
    logs = REPO / "benchmarks/results"
    with ExitStack() as stack:
        servers = [
            stack.enter_context(Server(peer, env, args.port + i, logs / f"bench-{peer.name}.log"))
            for i, peer in enumerate(peers)
        ]
        for server in servers:
            print(f"{server.peer.name}: ready in {server.wait_ready():.1f} s: {' '.join(server.argv)}", flush=True)
        idle = idle_cpu([s.proc.pid for s in servers if s.proc is not None], IDLE_PROBE_S)
        print(
            "idle, share of one core: "
            + ", ".join(f"{s.peer.name} {u:.1%}" for s, u in zip(servers, idle, strict=True))
        )
        argv = [str(args.blink_bin), "bench", "--protocol", "sse", "--url", servers[0].base_url, "--label", "blink"]
        argv += ["--url2", servers[1].base_url, "--label2", "llama-server", *bench_flags]
        print("$", " ".join(argv), flush=True)
        done = subprocess.run(argv, check=False)
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
