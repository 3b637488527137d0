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
