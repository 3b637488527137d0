"""engines/vllm.py's parts that need no vLLM (what `--engine vllm` refuses before it starts, how blink's flags
become vLLM's arguments) and engines/vllm_guard.py, the plugin that ends vLLM's processes with blink's. The engine
itself is tested against a real vLLM in tests/contract/test_engines.py and tests/e2e/test_vllm_engine.py
(opt-in: make install-vllm, pytest -m vllm)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blink.worker.engines import vllm
from blink.worker.engines.vllm_guard import OWNER_ENV


def hf_folder(tmp_path: Path, *, tokenizer: bool = True) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def with_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if vLLM were installed (whether or not it is here)."""
    real = vllm.importlib.util.find_spec
    monkeypatch.setattr(vllm.importlib.util, "find_spec", lambda name: object() if name == "vllm" else real(name))


def test_without_vllm_installed_the_check_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm.importlib.util, "find_spec", lambda name: None)
    problem = vllm.check(hf_folder(tmp_path), "")
    assert problem is not None and "make install-vllm" in problem


@pytest.mark.usefixtures("with_vllm")
def test_the_check_wants_a_hugging_face_folder_with_a_tokenizer(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    problem = vllm.check(gguf, "")
    assert problem is not None and "Hugging Face folder" in problem and "docs/vllm.md" in problem
    folder = hf_folder(tmp_path, tokenizer=False)
    problem = vllm.check(folder, "")
    assert problem is not None and "tokenizer.json" in problem
    (folder / "tokenizer.json").write_text("{}")
    assert vllm.check(folder, "") is None


@pytest.mark.usefixtures("with_vllm")
@pytest.mark.parametrize(("args", "says"), [("{not json", "not JSON"), ("[1, 2]", "JSON object")])
def test_vllm_args_must_be_a_json_object(tmp_path: Path, args: str, says: str) -> None:
    problem = vllm.check(hf_folder(tmp_path), args)
    assert problem is not None and says in problem


def test_vllm_args_are_read_as_given() -> None:
    assert vllm.parse_args("") == {}
    assert vllm.parse_args('{"dtype": "float32", "compilation_config": {"mode": 0}}') == {
        "dtype": "float32",
        "compilation_config": {"mode": 0},
    }


def test_speculative_flags_become_vllms_config() -> None:
    assert vllm.speculative_config("off", "", 5) is None
    ngram = vllm.speculative_config("ngram", "", 5)
    assert ngram is not None and ngram["method"] == "ngram" and ngram["num_speculative_tokens"] == 5
    draft = vllm.speculative_config("draft", "/models/small", 3)
    assert draft == {"method": "draft_model", "model": "/models/small", "num_speculative_tokens": 3}


def test_the_cli_refuses_a_model_vllm_cannot_read(tmp_path: Path) -> None:
    """`blink serve --engine vllm` with blink's bundled (GGUF) model: a clear error and exit 2, before anything
    starts (with vLLM installed or not: either way the message says what to do)."""
    done = subprocess.run(
        [sys.executable, "-m", "blink.cli", "serve", "--engine", "vllm", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "make install-vllm" in done.stderr or "Hugging Face folder" in done.stderr


def test_tracing_hands_vllm_blinks_collector_over_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert vllm._otlp_endpoint() == ""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    assert vllm._otlp_endpoint() == "http://collector:4318/v1/traces"
    assert os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"  # vLLM's default is gRPC


OWNER = """
import os, subprocess, sys, time
env = {**os.environ, "%(env)s": str(os.getpid())}
child = subprocess.Popen([sys.executable, "-c", %(child)r], env=env)
print(child.pid, flush=True)
time.sleep(120)
"""
CHILD = """
import threading, time
from blink.worker.engines.vllm_guard import register
register()
print("threads", threading.active_count(), flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as gone
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.parametrize("guarded", [True, False])
def test_a_process_vllm_starts_for_blink_ends_when_blinks_process_is_killed(guarded: bool) -> None:
    """The guard plugin in a child of an owner process: SIGKILL the owner, and the child ends on its own. Without
    the owner's variable (vLLM started by anything but blink) the plugin starts no watch at all."""
    script = OWNER % {"env": OWNER_ENV if guarded else "SOMETHING_ELSE", "child": CHILD}
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    child = int(owner.stdout.readline())
    try:
        # the child's own line, on the stdout it inherited: its threads once the plugin registered (+1: the watch)
        assert owner.stdout.readline().split() == ["threads", "2" if guarded else "1"]
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 15
        while guarded and alive(child):
            assert time.monotonic() < deadline, "the orphaned child lives on"
            time.sleep(0.1)
    finally:
        owner.stdout.close()
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_guard_is_a_vllm_plugin_of_blinks_package() -> None:
    from importlib.metadata import entry_points

    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("blink_owner_guard") == "blink.worker.engines.vllm_guard:register"


def test_the_json_of_the_docs_example_is_valid() -> None:
    text = (Path(__file__).parents[3] / "docs" / "vllm.md").read_text()
    examples = [
        line.split("--vllm-args ", 1)[1].strip().strip("'") for line in text.splitlines() if "--vllm-args '" in line
    ]
    assert examples
    for example in examples:
        assert isinstance(json.loads(example), dict)
