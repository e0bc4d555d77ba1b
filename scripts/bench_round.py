"""Round time of the one-program round vs a Python loop over clients (thin wrapper).

The benchmark lives in :mod:`spry_jax.bench.throughput`; this script keeps the old command::

    python scripts/bench_round.py --clients=10,100 --repeats=3 --devices=
"""

from spry_jax.bench.throughput import main

if __name__ == "__main__":
    main()
