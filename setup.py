"""The C kernels (src/blink/models/_native.c, _attention.c, _q4.c, _decode.c); everything else is in pyproject.toml.
Optional: without a compiler blink installs and runs on the torch ops it replaces (bit for bit the same results,
slower)."""

from setuptools import Extension, setup

KERNELS = "src/blink/models/"

setup(
    ext_modules=[
        Extension(
            "blink.models._native",
            [KERNELS + name for name in ("_native.c", "_attention.c", "_q4.c", "_decode.c")],
            depends=[KERNELS + "_kernels.h"],
            # no FMA contraction: the kernel must round exactly as the torch ops it replaces
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-std=c11"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
