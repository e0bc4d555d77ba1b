"""XLA flags of the test suite, for tests that start processes with their own ``XLA_FLAGS``.

Compile time is about two thirds of the suite on a fresh clone. The tests compare programs with
each other and with independent computations, never against the speed of the code, and XLA's
memory figures are its buffer assignment, fixed before LLVM runs; so LLVM's optimisation level
0 without its expensive passes (XLA's HLO passes are unchanged) halves the compile time at no
cost to what is checked (tests/core/test_round.py on a cold cache, 2 workers: 261 s -> 131 s).
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_fast_compile(flags: str = "") -> str:
    """``flags`` plus :data:`FAST_COMPILE`, unless they set an optimisation level already."""
    if "xla_backend_optimization_level" in flags:
        return flags
    return f"{flags} {FAST_COMPILE}".strip()
