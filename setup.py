"""The C kernels (src/blink/models/_native.c, _attention.c, _q4.c); everything else is in pyproject.toml. Optional: without a compiler
blink installs and runs on the torch ops it replaces (bit for bit the same results, slower)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "blink.models._native",
            ["src/blink/models/_native.c", "src/blink/models/_attention.c", "src/blink/models/_q4.c"],
            # no FMA contraction: the kernel must round exactly as the torch ops it replaces
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-std=c11"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
