"""What the simulated users do and when: arrivals (a trace, a Poisson rate, or a closed-loop concurrency ramp) and
one `Job` per session. Pure: no I/O but reading the trace file, every choice seeded.

A session: the user pastes some context, types a short question word by word (one `input_text.draft` per word on
the WebSocket), maybe opens a stored document, submits, reads the answer, and sometimes interrupts it midway.

Trace lengths are far beyond what a 135M model on a few CPU cores serves interactively (the Mooncake
conversation trace: median input 6,900 tokens, output 350), so they are mapped down, in proportion:

    context  each 512-token block of the trace (one `hash_ids` entry) becomes BLOCK_WORDS (8) words of text that
             depend only on the block's hash id: about 1/64 of the trace's length, and two sessions whose
             hash_ids share leading blocks share that prefix of their prompt (as the trace's turns of one
             conversation do). At most (--max-prompt-tokens - --question-words) / 8 blocks, at least 2.
    output   output_length / OUTPUT_DIVISOR (10), within [MIN_OUTPUT_TOKENS, --max-output-tokens]

Without a trace, a session has 2 to the most blocks, uniformly, the first one (hash id 0, like a system prompt)
shared by all, and asks for a quarter to all of --max-output-tokens.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blink.config import BenchConfig

BLOCK_WORDS = 8  # words of text per 512-token block of the trace
TRACE_BLOCK_TOKENS = 512  # Mooncake's block size (one hash id per block)
OUTPUT_DIVISOR = 10
MIN_OUTPUT_TOKENS = 4
MIN_BLOCKS = 2
DOCUMENTS = 4  # synthetic documents stored before a WebSocket run
DOCUMENT_WORDS = 360  # about three of the server's 120-word chunks each

_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her this which are be have an or had not but "
    "they were one all their has been there who more can would about when if into time after other two new "
    "most also first some these over only year city than may people many between during under such three "
    "water system world river house school music market light energy north south early later family small "
    "large long high old state game story power field forest ocean island garden kitchen window letter road "
    "bridge station village mountain winter summer autumn spring morning evening train paper stone metal glass "
    "animal plant bird horse wolf elephant lion tree flower fruit bread coffee table chair doctor teacher "
    "engineer artist farmer student report meeting project budget plan question answer reason result method"
)
WORDS = tuple(_WORD_TEXT.split())

QUESTIONS = (
    "Can you summarise the text above in two sentences?",
    "What is the main point of this and why does it matter?",
    "Please list three facts from the text above.",
    "Explain this to me like I am ten years old.",
    "Which parts of the text above are unclear or missing?",
    "Write a short reply to this for my team.",
    "What would be a good title for the text above?",
    "Give me the key numbers and names mentioned here.",
)


@dataclass(frozen=True)
class TraceRow:
    at_s: float  # arrival, seconds after the trace's first row
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class Job:
    """One session's plan. `at_s` is when the user starts typing, seconds from the start of the run; they submit
    `len(question) * typing_ms` later."""

    index: int
    at_s: float
    context: str
    question: tuple[str, ...]
    max_tokens: int
    interrupt_after: int | None  # deltas read before the user cancels; None: reads to the end
    document: int | None  # index into the stored documents (ws only)

    @property
    def prompt(self) -> str:
        return self.draft(len(self.question))

    def draft(self, words: int) -> str:
        """The user's message after typing `words` words of the question."""
        return f"{self.context}\n\n{' '.join(self.question[:words])}".strip()


@dataclass(frozen=True)
class Stage:
    """A closed-loop stage: `users` sessions in flight from `start_s` to `end_s`."""

    users: int
    start_s: float
    end_s: float


def load_trace(path: Path) -> list[TraceRow]:
    """The rows of a Mooncake-style JSON Lines trace, by arrival. Raises ValueError on a malformed line."""
    rows: list[TraceRow] = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                rows.append(
                    TraceRow(
                        float(raw["timestamp"]) / 1000,
                        int(raw["input_length"]),
                        int(raw["output_length"]),
                        tuple(int(h) for h in raw.get("hash_ids", ())),
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a trace row ({e})") from e
    if not rows:
        raise ValueError(f"{path}: no rows")
    rows.sort(key=lambda r: r.at_s)
    first = rows[0].at_s
    return [TraceRow(r.at_s - first, r.input_length, r.output_length, r.hash_ids) for r in rows]


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Arrival times in [0, duration_s) of a Poisson process of `rate` per second (exponential gaps)."""
    if rate <= 0:
        raise ValueError("the rate must be positive")
    rng, t = random.Random(seed), 0.0
    out: list[float] = []
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        out.append(t)


def trace_arrivals(rows: Sequence[TraceRow], time_scale: float, start_s: float, duration_s: float) -> list[float]:
    """The rows' arrival times from `start_s` into the trace, played `time_scale` trace seconds per second, that
    fall within `duration_s`."""
    if time_scale <= 0:
        raise ValueError("the time scale must be positive")
    times = ((r.at_s - start_s) / time_scale for r in rows if r.at_s >= start_s)
    return [t for t in times if t < duration_s]


def parse_ramp(spec: str, duration_s: float) -> list[Stage]:
    """`--concurrency`: "8" (one stage), "1,2,4,8" (equal stages over `duration_s`) or "1:10,4:20" (a stage's own
    seconds; stages without seconds share what is left of `duration_s`). The stages must fit in `duration_s`."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError("--concurrency: expected N, N,N,... or N:SECONDS,...")
    users: list[int] = []
    seconds: list[float | None] = []
    for part in parts:
        n_text, _, s_text = part.partition(":")
        try:
            n, s = int(n_text), float(s_text) if s_text else None
        except ValueError:
            raise ValueError(f"--concurrency: {part!r} is not N or N:SECONDS") from None
        if n < 1 or (s is not None and s <= 0):
            raise ValueError(f"--concurrency: {part!r}: users and seconds must be positive")
        users.append(n)
        seconds.append(s)
    fixed = sum(s for s in seconds if s is not None)
    free = sum(s is None for s in seconds)
    share = (duration_s - fixed) / free if free else 0.0
    if fixed > duration_s + 1e-9 or (free and share <= 0):
        raise ValueError(f"--concurrency: the stages need more than --duration-s ({duration_s:g} s)")
    stages, t = [], 0.0
    for n, s in zip(users, seconds, strict=True):
        length = s if s is not None else share
        stages.append(Stage(n, t, t + length))
        t += length
    return stages


class Sessions:
    """Makes the i-th session of a run. The same config and index give the same session, whatever the order they
    are asked in (each has its own seeded generator), so two targets get the same sessions."""

    def __init__(self, cfg: BenchConfig, trace: Sequence[TraceRow] = ()) -> None:
        self.cfg = cfg
        self.rows = [r for r in trace if r.at_s >= cfg.trace_start_s] or list(trace)
        self.max_blocks = max(MIN_BLOCKS, (cfg.max_prompt_tokens - cfg.question_words) // BLOCK_WORDS)

    def job(self, index: int, at_s: float) -> Job:
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + index)
        if self.rows:
            row = self.rows[index % len(self.rows)]
            hash_ids = row.hash_ids or tuple(range(math.ceil(row.input_length / TRACE_BLOCK_TOKENS)))
            blocks = max(MIN_BLOCKS, min(len(hash_ids), self.max_blocks))
            hash_ids = (hash_ids + (hash_ids[-1],) * blocks)[:blocks]
            max_tokens = round(row.output_length / OUTPUT_DIVISOR)
        else:
            blocks = rng.randint(MIN_BLOCKS, self.max_blocks)
            hash_ids = (0, *(1_000_000_000 + index * 1000 + b for b in range(1, blocks)))  # only block 0 shared
            max_tokens = rng.randint(max(1, cfg.max_output_tokens // 4), cfg.max_output_tokens)
        max_tokens = max(MIN_OUTPUT_TOKENS, min(cfg.max_output_tokens, max_tokens))
        question = tuple(rng.choice(QUESTIONS).split())[: max(1, cfg.question_words)]
        interrupt = rng.randint(1, max(1, max_tokens // 2)) if rng.random() < cfg.interrupt_fraction else None
        document = rng.randrange(DOCUMENTS) if rng.random() < cfg.document_fraction else None
        context = " ".join(block_text(h) for h in hash_ids)
        return Job(index, at_s, context, question, max_tokens, interrupt, document)

    def warmup(self, index: int) -> Job:
        """A short unmeasured session (no interrupt, no document, no typing)."""
        return Job(-1 - index, 0.0, block_text(-1 - index), ("Say", "hello."), 8, None, None)


def block_text(hash_id: int) -> str:
    """BLOCK_WORDS words that depend only on `hash_id`."""
    rng = random.Random(hash_id)
    return " ".join(rng.choice(WORDS) for _ in range(BLOCK_WORDS))


def documents(seed: int) -> list[tuple[str, str]]:
    """(id, text) of the synthetic documents a WebSocket run stores: sentences of DOCUMENT_WORDS words in all."""
    out = []
    for d in range(DOCUMENTS):
        rng = random.Random(f"doc-{seed}-{d}")
        sentences, words = [], 0
        while words < DOCUMENT_WORDS:
            n = rng.randint(8, 16)
            sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
            words += n
        out.append((f"bench-{seed}-{d}", " ".join(sentences)))
    return out


def open_loop(cfg: BenchConfig, trace: Sequence[TraceRow]) -> list[float]:
    """The arrival times of an open-loop run: --rate's Poisson process, else the trace's timestamps, else 1/s."""
    if cfg.rate > 0 or not trace:
        return poisson_arrivals(cfg.rate if cfg.rate > 0 else 1.0, cfg.duration_s, cfg.seed)
    return trace_arrivals(trace, cfg.time_scale, cfg.trace_start_s, cfg.duration_s)
