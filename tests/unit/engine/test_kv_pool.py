"""The KV pool takes memory as its blocks are written, not all of it at start (attention.zero_pages): an
unwritten page reads as zero and costs nothing; a written one is the process's like any other."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from blink.engine.attention import zero_pages

MIB = 1 << 20


def resident_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def test_a_pool_is_resident_only_where_it_was_written() -> None:
    before = resident_mib()
    pool = zero_pages((256 * MIB // 4 // 64, 64), torch.float32)  # 256 MiB
    assert float(pool.max()) == 0.0 and float(pool.min()) == 0.0  # read whole: zeros, and still not resident
    assert resident_mib() - before < 64
    pool[: 128 * MIB // 4 // 64] = 1.0  # half of it written
    assert resident_mib() - before > 100
    assert float(pool.sum()) == 128 * MIB // 4
    del pool
