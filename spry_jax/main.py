"""Command line: ``python -m spry_jax.main --config=experiments/<name>.py --workdir=DIR``.

Any config field can be overridden with ``--config.KEY=VALUE``; a config file may take a
variant after a colon (``--config=experiments/quickstart.py:local``). Rerunning the same command
resumes from the last checkpoint in ``DIR``. A user error -- a bad flag, config file or value,
bad data, a workdir that cannot be resumed, a run that does not fit in memory -- exits with
status 2 and one line (:func:`user_error_line`); anything else is a bug and keeps its traceback.

Several processes (hosts): run the same command in each with ``--multihost`` and, unless the
cluster is auto-detected (Slurm, Open MPI, Cloud TPU, Kubernetes), ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``); see :mod:`spry_jax.multihost`.
"""

import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_flags_lib

from spry_jax import config as config_lib
from spry_jax import multihost, reporting, train
from spry_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics and checkpoints.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (one process per host)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0's coordinator (--multihost; default $JAX_COORDINATOR_ADDRESS, "
    "else auto-detected).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the run (--multihost; default $JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (--multihost; default $JAX_PROCESS_ID)."
)
_LOCAL_DEVICES = flags.DEFINE_list(
    "local_device_ids", None, "Devices this process uses (--multihost; default all local)."
)
flags.mark_flags_as_required(["config", "workdir"])


def fail(prog: str, message: str) -> None:
    """Prints ``prog: error: message`` as one line on stderr and exits with status 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def _last_line(text: str) -> str:
    """The last line of a message that embeds a traceback (ml_collections' config errors)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    last = lines[-1] if lines else str(text)
    return re.sub(r"^spry_jax(\.\w+)*\.\w+Error: ", "", last)


def flag_error_line(e: Exception, argv: list[str], config_flag: str = "config") -> str:
    """One line for a command-line error: a missing config file names the path, an unknown
    ``--config.KEY`` names the closest declared fields."""
    text = str(e)
    if isinstance(e, config_flags_lib.UnsupportedOperationError):
        # A field whose type ml_collections cannot parse (config_lib.register_cli_parsers adds
        # the declared ones); its message lists the parsers, which tells the user nothing.
        m = re.search(r"Type (.+?) of field (\S+) is not supported", text)
        if m:
            return (
                f"--{m.group(2)}: a field of type {m.group(1)} cannot be set from the command "
                "line; set it in the config file"
            )
    if isinstance(e, (AttributeError, KeyError, flags.UnrecognizedFlagError)):
        declared = sorted(config_lib.flatten(config_lib.default_config()))
        groups = {f.rsplit(".", i)[0] for f in declared for i in range(1, f.count(".") + 1)}
        for a in argv:
            if a.startswith(f"--{config_flag}."):
                key = a[len(config_flag) + 3 :].split("=", 1)[0]
                if (
                    key not in declared
                    and key not in groups
                    and not key.startswith("model.overrides.")
                ):
                    close = config_lib.closest_fields(key, declared)
                    hint = f"; did you mean {', '.join(close)}?" if close else ""
                    return f"--{config_flag}.{key}: {key!r} is not a config field{hint}"
    path = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{config_flag}=")), None)
    if path is not None and ("No such file" in text or "Failed loading config file" in text):
        file = path.split(":", 1)[0]
        if not os.path.isfile(file):
            return f"--{config_flag}={path}: no such file {file!r} (relative to {os.getcwd()})"
    return _last_line(text)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with the config file loaded here so a bad one fails in one line."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # loads the file and applies the overrides (lazily otherwise)
    except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        fail("spry_jax.main", flag_error_line(e, argv))
    return rest


def main(argv):
    logging.get_absl_handler().addFilter(reporting.QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _MULTIHOST.value:
        multihost.initialize(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            [int(i) for i in _LOCAL_DEVICES.value] if _LOCAL_DEVICES.value else None,
        )
    elif any(f.present for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _LOCAL_DEVICES)):
        raise app.UsageError("--coordinator_address/--num_processes/--process_id need --multihost")
    logging.info(
        "process %d of %d; devices: %d local, %d in all: %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices(),
    )
    try:
        summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except UserError as e:
        fail("spry_jax.main", str(e))
    logging.info("Done: %s", summary)
    table = reporting.final_table(summary, _CONFIG.value.report.reference)
    if table and multihost.is_primary():
        print(table, flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
