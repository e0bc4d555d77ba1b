"""Command line: ``python -m spry_jax.main --config=experiments/<name>.py --workdir=DIR``.

Any config field can be overridden with ``--config.KEY=VALUE``; a config file may take a
variant after a colon (``--config=experiments/quickstart.py:local``). Rerunning the same command
resumes from the last checkpoint in ``DIR``.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from spry_jax import reporting, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics and checkpoints.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (one process per host)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    logging.get_absl_handler().addFilter(reporting.QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _MULTIHOST.value:
        jax.distributed.initialize()
    logging.info("JAX devices: %s", jax.devices())
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("Done: %s", summary)
    table = reporting.final_table(summary, _CONFIG.value.report.reference)
    if table and jax.process_index() == 0:
        print(table, flush=True)


if __name__ == "__main__":
    app.run(main)
