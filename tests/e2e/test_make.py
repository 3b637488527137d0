"""`make serve ARGS=…`, dry-run: every blink command the target runs gets the flags (a model given with --model
is the one prepared, in the --cache-dir given)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_make_serve_passes_args_to_every_blink_command() -> None:
    args = "--model smollm2-135m-instruct --cache-dir /tmp/blink-cache --port 9000"
    out = subprocess.run(
        ["make", "--dry-run", "--no-print-directory", "-C", str(ROOT), "serve", f"ARGS={args}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = [line for line in out.splitlines() if "/bin/blink " in line]
    assert commands and all(line.endswith(args) for line in commands), commands
