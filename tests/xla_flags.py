"""XLA flags of the test suite, for tests that start processes with their own ``XLA_FLAGS``.

Compile time is about two thirds of the suite on a fresh clone. The tests compare programs with
each other and with independent computations, never against the speed of the code, and XLA's
memory figures are its buffer assignment, fixed before LLVM runs; so LLVM's optimisation level
0 without its expensive passes (XLA's HLO passes are unchanged) halves the compile time at no
cost to what is checked (tests/core/test_round.py on a cold cache, 2 workers: 261 s -> 131 s).

Two more flags cut the codegen itself: XLA's older elemental emitters for fusions instead of the
MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``), and one LLVM module per program
instead of several compiled on parallel threads (``--xla_cpu_parallel_codegen_split_count=1``:
with one pytest worker per core the threads only contend). tests/core/test_round.py with
tests/test_methods.py on a cold cache, 2 workers: 187 s -> 145 s (the first flag) -> 123 s
(both). Rejected: ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` (118 s, but it changes
XLA's schedule, and one of those 47 tests then fails).
"""

FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
)


def with_fast_compile(flags: str = "") -> str:
    """``flags`` plus :data:`FAST_COMPILE`, unless they set an optimisation level already."""
    if "xla_backend_optimization_level" in flags:
        return flags
    return f"{flags} {FAST_COMPILE}".strip()
