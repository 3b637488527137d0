"""One frozen dataclass per subsystem, composed into `ServeConfig`.

Command-line flags are generated from the fields (blink/cli/flags.py), so a new setting is one field with a `help`
in its metadata. Nothing here reads the environment.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _help(
    text: str, default: Any = dataclasses.MISSING, *, choices: tuple[str, ...] | None = None, advanced: bool = False
) -> Any:
    """A field that is a flag. `advanced`: a tuning or test knob, listed by `--help-all` only (not `--help`)."""
    metadata = {"help": text, "choices": choices, "advanced": advanced}
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


WEIGHT_FORMATS = ("w8a8", "q4", "int8", "fp32", "bf16")
KV_CACHE_DTYPES = ("auto", "fp16", "fp32")
SPECULATIVE_POLICIES = ("adaptive", "always")


def kv_cache_bytes(weights: str, kv_cache_dtype: str) -> int:
    """Bytes per KV cache element for `--weights` and `--kv-cache-dtype` as given (before the model is loaded; the
    engine resolves `auto` from the loaded model: runner.kv_cache_dtype, the same rule)."""
    if kv_cache_dtype == "fp32" or (kv_cache_dtype == "auto" and weights == "fp32"):
        return 4
    return 2


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "blink"


@dataclass(frozen=True)
class ModelConfig:
    model: str = _help(
        "model to serve: a name from `blink models`, a .gguf file, or a Hugging Face folder (config.json, "
        "*.safetensors, tokenizer.json)",
        "smollm2-135m-instruct",
    )
    served_model_name: str = _help(
        "the name clients give as `model` (and /v1/models lists); gateways and workers of one pool must agree on "
        "it. Empty: the --model name, the .gguf file's name without .gguf, or the folder's name",
        "",
    )
    cache_dir: Path = _help("where prepared models are kept", default_cache_dir())

    def served_name(self) -> str:
        """The name clients use (requests' `model`, /v1/models, the replicas' pool on the bus): --served-model-name,
        else the name `models.source.resolve(model)` gives, from the text alone (no file is read)."""
        if self.served_model_name:
            return self.served_model_name
        name = Path(os.path.abspath(os.path.expanduser(self.model))).name
        return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


ENGINES = ("blink", "vllm", "openai")  # blink's own (worker/replica.py), vLLM's AsyncLLM, an OpenAI-compatible server
UPSTREAM_API_KEY_ENV = ("BLINK_UPSTREAM_API_KEY",)


@dataclass(frozen=True)
class EngineConfig:
    engine: str = _help(
        "the engine a replica drives: blink (its own, on this machine's CPU), vllm (vLLM's AsyncLLM in the worker, "
        "for a Hugging Face folder --model; `make install-vllm`) or openai (an OpenAI-compatible server at "
        "--upstream: llama-server, vllm serve, SGLang, TGI, another blink; its key from BLINK_UPSTREAM_API_KEY)",
        "blink",
        choices=ENGINES,
    )
    upstream: str = _help("--engine openai: the upstream server's URL (http://host:port, with or without /v1)", "")
    upstream_model: str = _help(
        "--engine openai: the upstream's model id (empty: the first its /v1/models lists); clients use "
        "--served-model-name, else this, else the --model name",
        "",
    )
    upstream_api_key: str = field(default="", repr=False, metadata={"env": UPSTREAM_API_KEY_ENV})
    vllm_args: str = _help(
        "--engine vllm: more vLLM engine arguments, a JSON object of AsyncEngineArgs' fields (e.g. "
        '\'{"dtype": "float32", "speculative_config": {...}}\'); they win over blink\'s flags',
        "",
        advanced=True,
    )
    threads: int = _help("torch threads for the model (0: one per core)", 0)
    max_num_seqs: int = _help("sequences decoded together in one batch", 16)
    max_model_len: int = _help("longest prompt + output, in tokens", 2048)
    max_num_batched_tokens: int = _help(
        "tokens one engine step may run (prompt chunks and decodes)", 512, advanced=True
    )
    prefill_chunk_tokens: int = _help(
        "prompt tokens one step may prefill while streams are decoding (bounds their inter-token delay; a burst of "
        "prompts outnumbering the decoding streams takes the whole step budget)",
        16,
        advanced=True,
    )
    background_period: int = _help(
        "while live streams decode, background work (pre-loads) prefills in one step of this many, up to "
        "--background-step-tokens (such a step leaves the fused decode path: rare and large costs live streams "
        "least)",
        128,
        advanced=True,
    )
    background_step_tokens: int = _help(
        "prompt tokens one step may prefill for background work when no live stream decodes (a live request "
        "arriving waits for at most that step)",
        96,
        advanced=True,
    )
    preload_max_tokens: int = _help(
        "longest prompt one pre-load may prefill (its cap on speculative KV)", 1024, advanced=True
    )
    kv_cache_mb: int = _help("memory for the paged KV cache, in MiB (all sequences and the prefix cache)", 512)
    kv_cache_dtype: str = _help(
        "precision of the KV cache: auto (fp16 for quantized weights, as llama.cpp's default cache; the model's own "
        "dtype for fp32 and bf16 weights), fp16 (half the memory of fp32 per token), fp32",
        "auto",
        choices=KV_CACHE_DTYPES,
        advanced=True,
    )
    block_size: int = _help("tokens per KV cache block", 16, advanced=True)
    prefix_caching: bool = _help("reuse the KV of prompt prefixes already computed", True, advanced=True)
    shared_prefixes: str = _help(
        "JSON file with a list of system prompts whose prefix-cache blocks every tenant may share (the rest of the "
        "cache is partitioned per tenant); empty: none",
        "",
        advanced=True,
    )
    weights: str = _help(
        "weight format of the linear layers (auto: q4 for a Q4_0/Q4_1/Q4_K GGUF, else w8a8; "
        "q4: 4-bit weights in blink's C kernel, the GGUF's own 4-bit blocks kept; w8a8: int8 weights and "
        "activations; int8: int8 weight-only, closest to fp32)",
        "auto",
        choices=("auto", *WEIGHT_FORMATS),
    )
    native_kernels: bool = _help(
        "run q4 and w8a8 layers and decode attention in blink's C kernels (built at install; AVX-512 VNNI or AVX2); "
        "--no-native-kernels: torch ops only (w8a8's same numbers, slower; no q4)",
        True,
        advanced=True,
    )
    warmup_steps: int = _help("warm-up generations before the replica takes traffic", 2, advanced=True)
    speculative: str = _help(
        "speculative decoding: ngram (prompt lookup), draft:<model> (a smaller model with the same vocabulary, "
        "see `blink models`) or off; output is the same as without (greedy: token for token)",
        "ngram",
    )
    speculative_tokens: int = _help(
        "most tokens proposed per sequence and step; the engine proposes fewer (or none) when the measured "
        "acceptance and step costs say they don't pay",
        5,
        advanced=True,
    )
    prediction_tokens: int = _help(
        "most tokens of a request's own prediction (OpenAI Predicted Outputs) verified per step, fewer when the "
        "measured acceptance and step costs say they don't pay; 0: predictions are ignored",
        16,
        advanced=True,
    )
    speculative_policy: str = _help(
        "adaptive: as many guesses as the measured acceptance and step costs say pay (none when they don't); "
        "always: --speculative-tokens guesses whenever the proposer has them (vLLM's behaviour; for tests and "
        "comparisons)",
        "adaptive",
        choices=SPECULATIVE_POLICIES,
        advanced=True,
    )


@dataclass(frozen=True)
class GatewayConfig:
    host: str = _help("address to listen on", "127.0.0.1")
    port: int = _help("port to listen on", 8000)
    stream_queue_events: int = _help(
        "events buffered per response for a slow client; past it the response is cancelled", 1024, advanced=True
    )
    max_pending_requests: int = _help("requests queued for replicas before new ones get 429", 256, advanced=True)
    first_token_deadline_s: float = _help(
        "new requests get 429 overloaded when every replica estimates a new request would wait longer than this "
        "for its first token (from its measured prefill and finish rates); 0: never",
        10.0,
        advanced=True,
    )
    max_request_bytes: int = _help("largest accepted HTTP body or WebSocket message", 1 << 20, advanced=True)
    request_timeout_s: float = _help(
        "longest a request may take, queue + generation; past it the replica frees it (deadline_exceeded)", 600.0
    )
    shutdown_grace_s: float = _help("seconds in-flight streams get to finish on SIGTERM", 5.0, advanced=True)
    preload: bool = _help("pre-load while the user types: prefill the predicted prompt on input_text.draft", True)
    preload_ttl_s: float = _help("a pre-load not done this long after its draft is dropped", 30.0, advanced=True)
    predecode_tokens: int = _help(
        "pre-decode: when a draft has been still a moment, decode up to this many tokens of its answer (sent at "
        "once on a submit of that text); 0: off",
        8,
        advanced=True,
    )
    resume_window_s: float = _help(
        "a streamed response whose client vanished keeps running this long for it to resume (WebSocket "
        "response.resume, SSE Last-Event-ID), and an ended one is kept as long; 0: cancel at once, no resume",
        10.0,
    )
    session_ttl_s: float = _help(
        "a realtime session (settings, conversation) is kept this long after its last use", 3600.0
    )
    allowed_origins: str = _help(
        "web pages that may open WebSockets besides this server's own, comma-separated origins "
        "(https://app.example:8443); '*': any. Empty: pages of loopback addresses (localhost, 127.0.0.1, [::1], any "
        "port). A handshake with no Origin (not a browser) is always accepted, one from another page gets 403",
        "",
    )
    allowed_hosts: str = _help(
        "Host header names accepted, comma-separated ('*.example.com' for subdomains; '*': any), a defence "
        "against DNS rebinding; others get 400. Empty: localhost, 127.0.0.1, [::1] and --host",
        "",
    )
    cors_origins: str = _help(
        "web pages allowed to call the HTTP API from browser scripts (CORS), comma-separated origins; '*': any. "
        "Empty: CORS off",
        "",
    )
    api_keys: str = _help(
        "the API keys file (`blink keys add`; also BLINK_API_KEYS): each key names a tenant and its limits; a "
        "change to the file takes effect at once. Empty: no keys, blink runs open as one tenant (loopback only)",
        "",
    )
    allow_unauthenticated: bool = _help(
        "serve without API keys on a non-loopback --host (anyone who reaches the port is the one tenant)", False
    )
    max_connections: int = _help("HTTP requests and WebSockets open at once, all tenants together; 0: no cap", 1024)


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may use (gateway/limits.py enforces them); 0: no limit. The keys file sets them per tenant
    and its `defaults` for every tenant; an open server (no keys) runs its one tenant without limits."""

    max_concurrent_responses: int = _help("responses streaming at once", 8)
    requests_per_minute: int = _help("requests started in any 60 s (a cached answer counts too)", 600)
    tokens_per_minute: int = _help("prompt + completion tokens in any 60 s (counted as the responses run)", 200_000)
    max_sessions: int = _help("realtime sessions connected at once", 32)
    max_session_items: int = _help("conversation items one realtime session holds", 1000)
    max_session_bytes: int = _help("bytes of conversation text one realtime session holds", 4 << 20)
    drafts_per_second: float = _help("input_text.draft events per session acted on per second (more coalesce)", 10.0)
    max_documents: int = _help("documents stored (POST /v1/documents)", 1000)
    max_document_bytes: int = _help("bytes of document text stored in all", 64 << 20)
    cache_entries: int = _help("semantic cache entries the tenant's answers may hold", 2000)

    @classmethod
    def unlimited(cls) -> TenantLimits:
        return cls(**{f.name: 0 for f in dataclasses.fields(cls)})


CACHE_TURNS = ("first", "all")
EMBEDDERS = ("onnx", "onnx-int8", "torch")  # semantic_cache/embedder.py: EMBEDDERS


@dataclass(frozen=True)
class CacheConfig:
    semantic_cache: bool = _help("answer a query close in meaning to an earlier one from the semantic cache", True)
    cache_threshold: float = _help(
        "cosine similarity a cached query needs to answer a new one (chosen on ../shared/data/paraphrase: "
        "benchmarks/results/semantic_cache.md)",
        0.85,
        advanced=True,
    )
    cache_verify: bool = _help(
        "also require the two queries to agree on numbers, negations, opposites, names, roles and conditions, and the "
        "judge (a model of the pair fitted on Quora question pairs) to accept the candidate",
        True,
        advanced=True,
    )
    cache_false_hit_rate: float = _help(
        "the judge's target false-hit rate: the share of questions that need another answer (related questions, "
        "often a word apart) that may get a cached one; lower: fewer hits (see `blink cache-eval`)",
        0.01,
    )
    cache_ttl_s: float = _help("seconds a cached answer lives", 86400.0)
    cache_max_entries: int = _help("cached answers kept in all (least recently used go first)", 10000, advanced=True)
    cache_turns: str = _help(
        "which chat turns are cacheable: first (a conversation's first user message) or all (later turns too, "
        "each only for the same conversation so far)",
        "first",
        choices=CACHE_TURNS,
        advanced=True,
    )
    cache_embedder: str = _help(
        "embedding runtime for the cache and the document store: onnx-int8 (ONNX Runtime, int8 weights), onnx "
        "(fp32) or torch",
        "onnx-int8",
        choices=EMBEDDERS,
        advanced=True,
    )
    cache_embedder_threads: int = _help("threads the embedder may use", 1, advanced=True)
    cache_redis: str = _help(
        "Redis URL for the semantic cache alone (Redis 8 Vector Sets); empty: --redis's, if given, else in memory",
        "",
        advanced=True,
    )


REDIS_PASSWORD_ENV = ("BLINK_REDIS_PASSWORD", "REDIS_PASSWORD")  # the first one set wins


@dataclass(frozen=True)
class RedisConfig:
    redis: str = _help(
        "Redis URL (redis://host:6379/0, rediss:// for TLS): the event bus becomes Redis Streams, which `blink "
        "worker` processes on any machine join, and the semantic cache Redis 8 Vector Sets (empty: all in this "
        "process). The password comes from the environment, BLINK_REDIS_PASSWORD or REDIS_PASSWORD (one in the URL "
        "also works, but every user of the machine can read a process's arguments)",
        "",
    )
    local_replica: bool = _help(
        "with --redis, also run a replica in this process (off: a gateway only, served by `blink worker`s)", True
    )
    drain_timeout_s: float = _help(
        "on SIGTERM, a worker takes no new requests and finishes those it holds for up to this long; the rest it "
        "hands back to the other workers, which continue them (clients see no gap in their text)",
        20.0,
    )
    # not a flag (argv is visible to every user of the machine): cli.py reads it from the environment
    redis_password: str = field(default="", repr=False, metadata={"env": REDIS_PASSWORD_ENV})


CORE_KEY_ENV = ("BLINK_CORE_KEY",)


@dataclass(frozen=True)
class EdgeConfig:
    core: str = _help("the core gateway's http(s)://host:port, linked at start (its key: BLINK_CORE_KEY)", "")
    core_model: str = _help("the core's model `auto` sends core-bound requests to (empty: the first it lists)", "")
    routing: str = _help("a JSON routing table for `model: auto` replacing the default (docs/edge.md)", "")
    link_resume_window_s: float = _help(
        "how long responses on the core wait to resume over a dropped link (within the core's --resume-window-s)",
        10.0,
        advanced=True,
    )
    link_ping_s: float = _help("the link's ping interval (keeps it warm, measures its round trip)", 1.0, advanced=True)
    link_timeout_s: float = _help("an unanswered ping drops the link's connection after this long", 3.0, advanced=True)
    # not a flag (argv is visible to every user of the machine): cli.py reads it from the environment
    core_key: str = field(default="", repr=False, metadata={"env": CORE_KEY_ENV})


@dataclass(frozen=True)
class ServeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    edge: EdgeConfig | None = None  # `blink edge`: this gateway serves small requests and links to a core


def parse_speculative(value: str) -> tuple[str, str]:
    """--speculative -> (kind, draft model name): ("off", ""), ("ngram", "") or ("draft", name)."""
    if value in ("off", "ngram"):
        return value, ""
    kind, _, name = value.partition(":")
    if kind == "draft" and name:
        return kind, name
    raise ValueError(f"--speculative {value!r}: expected ngram, draft:<model> or off")


def resolve_threads(threads: int) -> int:
    return threads if threads > 0 else max(1, len(os.sched_getaffinity(0)))


BENCH_PROTOCOLS = ("ws", "sse")


@dataclass(frozen=True)
class BenchConfig:
    """`blink bench`: the load, the users' behaviour and where the report goes (see blink/bench/)."""

    url: str = _help(
        "the server to drive (blink, or any OpenAI-compatible server for --protocol sse)", "http://127.0.0.1:8000"
    )
    protocol: str = _help(
        "ws: blink's realtime WebSocket; sse: OpenAI chat completions, streamed", "ws", choices=BENCH_PROTOCOLS
    )
    label: str = _help("the server's name in the report (empty: its host:port)", "")
    url2: str = _help("a second server, driven after the first with the same sessions, for a side-by-side report", "")
    protocol2: str = _help("the second server's protocol (default: --protocol)", "", choices=BENCH_PROTOCOLS)
    label2: str = _help("the second server's name in the report (empty: its host:port)", "")
    model: str = _help("model name sent with every request", "smollm2-135m-instruct")
    api_key: str = _help("sent as Authorization: Bearer (empty: none)", "")
    duration_s: float = _help("seconds during which sessions start (those started then run to their end)", 60.0)
    rate: float = _help(
        "open loop: sessions per second, Poisson arrivals (default 1 unless --trace or --concurrency)", 0.0
    )
    trace: str = _help(
        "Mooncake-style JSON Lines trace {timestamp (ms), input_length, output_length, hash_ids}: its lengths and "
        "shared prefixes shape the sessions, and its timestamps are the arrivals unless --rate or --concurrency",
        "",
    )
    time_scale: float = _help("trace seconds played per second (0.25: four times slower than recorded)", 1.0)
    trace_start_s: float = _help("start this many seconds into the trace", 0.0)
    concurrency: str = _help(
        "closed loop: N users, each starting a session when its last one ends, or a ramp 1,2,4,8 (equal stages "
        "over --duration-s; 4:20 gives a stage its own seconds)",
        "",
    )
    max_prompt_tokens: int = _help("longest user message, in words (about tokens) of pasted context + question", 256)
    max_output_tokens: int = _help("longest answer asked for (max_tokens)", 64)
    question_words: int = _help("words the user types (one input_text.draft each) before submitting", 8)
    typing_ms: float = _help("milliseconds between typed words (SSE: the same wait, with no drafts sent)", 150.0)
    interrupt_fraction: float = _help("share of sessions whose user cancels the answer midway", 0.1)
    document_fraction: float = _help(
        "share of sessions that open a stored document and have retrieval on (ws only; the bench stores "
        "synthetic documents with POST /v1/documents first)",
        0.25,
    )
    temperature: float = _help("sampling temperature of every request", 0.7)
    ignore_eos: bool = _help("sse: ask for max_tokens tokens whatever the model says (ws has no such field)", True)
    server_cache: bool = _help("let the server answer from its semantic cache (blink's `cache` field)", False)
    warmup: int = _help("unmeasured sessions sent one at a time before the clock starts", 2)
    request_timeout_s: float = _help("a session not finished after this long counts as an error", 120.0)
    seed: int = _help("seed of the arrivals and the sessions (the same seed: the same sessions)", 0)
    typing: bool = _help(
        "keystroke replay (bench/typing.py): --concurrency N users (default 8) type questions key by key, with "
        "typos, pauses and edits from typing studies; reports Enter -> first token",
        False,
    )
    edit_fraction: float = _help("--typing: share of questions whose last word is revised just before Enter", 0.2)
    enter_pause_ms: float = _help("--typing: mean pause before Enter (the Keystroke-Level Model's M)", 1350.0)
    context: bool = _help("--typing: paste --max-prompt-tokens words of context before each question", False)
    out: str = _help("folder of the report (NAME.md, NAME.html, NAME.json)", "bench-results")
    name: str = _help("file name of the report, without extension", "bench")
    progress: bool = _help("show a progress bar on stderr", True)
