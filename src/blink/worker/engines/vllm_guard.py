"""A vLLM plugin (entry point `vllm.general_plugins`), loaded by vLLM in each process it starts: where blink started
that vLLM (BLINK_VLLM_OWNER names blink's process), a process whose parent goes away ends itself. A blink worker
killed with SIGKILL gets no chance to stop its vLLM engine-core process, which would otherwise live on, spinning on
the CPU, and its own workers with it; each now notices within a second that it was orphaned.

Elsewhere (vLLM started by anything but blink, `vllm serve` in the same environment) it does nothing."""

from __future__ import annotations

import os
import signal
import threading
import time

OWNER_ENV = "BLINK_VLLM_OWNER"
POLL_S = 0.5

_watching = False


def register() -> None:
    global _watching
    owner = os.environ.get(OWNER_ENV, "")
    if _watching or not owner.isdigit() or int(owner) == os.getpid():
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        # its parent changed (it was orphaned), or blink's process is gone (also when it died before this started)
        while os.getppid() == parent and _alive(int(owner)):
            time.sleep(POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up to wait for: the process that used us is gone

    threading.Thread(target=watch, name="blink-vllm-owner", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pid now belongs to another user's process: blink's is gone
        return False
    return True
