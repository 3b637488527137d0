def linear(
    x: int,
    m: int,
    k: int,
    smooth: int,
    packed: int,
    wsum: int,
    weight_scale: int,
    bias: int,
    y: int,
    n: int,
    kp: int,
    threads: int,
    level: int,
) -> None: ...
def best_level() -> int: ...
def attend_decode(
    q: int,
    q_row: int,
    q_head: int,
    k: int,
    v: int,
    out: int,
    o_row: int,
    o_head: int,
    rows: int,
    lens: int,
    offs: int,
    slots: int,
    r: int,
    heads: int,
    kv_heads: int,
    dim: int,
    scale: float,
    threads: int,
) -> None: ...
def q4_linear(x: int, m: int, k: int, w: int, bias: int, y: int, n: int, threads: int, level: int) -> None: ...
def q4_best_level() -> int: ...
