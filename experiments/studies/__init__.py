"""Study files for ``python -m spry_jax.study --study=experiments/studies/<name>.py``.

Each defines ``get_study()`` returning a :class:`spry_jax.study.Study`: a base experiment
config, the arms compared, a tuning grid per arm (chosen on a validation split held out of the
clients' training data), and the seeds of the final runs. See ``smoke.py``.
"""
