"""blink: real-time LLM serving."""

import os

# Batch invariance (a token's numbers never depend on what shares its step: speculative decoding's identical output
# rests on it) needs MKL, torch's BLAS on x86, to take one code path per call shape. Left to itself MKL chooses
# per call on some CPUs: measured on an AMD EPYC, 2 threads, a decode row's attention changed in the last bits with
# the number of sequences or guesses in the call, and 2 of 20 speculative answers differed from plain decoding.
# Conditional numerical reproducibility fixes the path (no slower there). MKL reads it at its first call, so it is
# set here, before blink runs any torch op; an operator's own MKL_CBWR wins.
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"
