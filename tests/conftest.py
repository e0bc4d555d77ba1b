"""Test-wide environment: offline Hugging Face, 8 fake CPU devices for sharding tests.

These must be set before JAX or transformers are imported anywhere in the session.
"""

import os
import tempfile

from tests.xla_flags import with_fast_compile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Identical programs (the smoke config built by several tests) compile once per session.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "spry_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# A size cap turns on JAX's file lock around cache writes, so pytest-xdist workers sharing the
# cache never read an entry another worker is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# Fast compiles (tests/xla_flags.py); set XLA_FLAGS with an optimisation level to test at another.
_flags = with_fast_compile(_flags)
os.environ["XLA_FLAGS"] = _flags.strip()

# Test files heaviest first (worker-seconds of the whole suite on the 2-core CI machine,
# `python -m pytest -q -n auto tests --junitxml=...`, summed per file). pyproject.toml's
# `--dist=loadfile` keeps a file on one worker, so a module fixture (the multi-process
# reference runs, the remat memory subprocess, the study run) is built once, not once per
# worker; starting the longest files first keeps both workers busy to the end.
_HEAVY_FIRST = (
    "tests/test_train.py",
    "tests/core/test_round.py",
    "tests/test_multihost.py",
    "tests/test_methods.py",
    "tests/test_bench.py",
    "tests/test_study.py",
    "tests/models/test_decoders.py",
    "tests/models/test_gguf.py",
    "tests/core/test_estimators.py",
    "tests/models/test_gptq.py",
    "tests/models/test_encoders.py",
    "tests/core/test_static_tangents.py",
    "tests/test_crash_resume.py",
    "tests/models/test_minilm.py",
    "tests/models/test_layers_peft.py",
    "tests/core/test_client_memory.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(_HEAVY_FIRST)}
    # A stable sort: the listed files first, in that order; every other file after them in
    # collection order; the tests inside a file keep their order.
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
