"""DrJAX (``pip install drjax``) as the client map of the per-epoch round, beside ours.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/drjax_check.py

Issue "One round, written once" asks whether DrJAX's ``map_fn`` / ``reduce_sum`` should carry
the round's client map. This script runs the toy per-epoch round body (tests/core) both ways
on 8 devices -- ours (``vmap`` inside ``shard_map``, a fixed-order sum over devices) and DrJAX
(``map_fn`` = ``vmap`` with ``spmd_axis_name``, ``reduce_sum`` = a GSPMD-sharded sum) -- and
prints the largest difference of the round's sums and the time per round body. DrJAX is not a
dependency of spry_jax; the result and the decision are in README ("The round program").
"""

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import drjax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from spry_jax.core import estimators as E  # noqa: E402
from spry_jax.core import round as R  # noqa: E402
from tests.core.test_round import SLOTS, _batches, _spec  # noqa: E402
from tests.core.toy import make_toy_model  # noqa: E402


def main(repeats: int = 20) -> None:
    model = make_toy_model(dropout=0.1)
    spec = _spec(model, "shard_map", "per_epoch")
    batches = _batches()
    state = R.init_server_state(model.trainable, spec.server_optimizer, seed=0)
    masks, keys = R._masks_and_keys(spec, jax.random.fold_in(state.rng, state.round))
    clients = R.ClientInputs(
        masks,
        {k: v for k, v in batches.items() if k != "step_mask"},
        batches["step_mask"],
        keys,
        None,
    )
    clients = jax.device_put(clients, NamedSharding(spec.mesh, P(R.CLIENT_AXIS)))
    steps = batches["step_mask"].shape[1]
    inputs = E.EstimatorInputs(step=state.round * steps, guide=state.last_delta)
    client = R._per_epoch_client(spec, False)
    ours = jax.jit(R._inner(spec, False))

    @jax.jit
    def with_drjax(params, frozen, clients, inputs):
        @drjax.program(placements={R.CLIENT_AXIS: SLOTS})
        def program(clients):
            # map_fn unpacks a tuple argument, and a NamedTuple is one.
            summed, _ = drjax.map_fn(
                lambda *c: client((params, frozen, inputs), R.ClientInputs(*c)),
                clients,
                mesh=spec.mesh,
            )
            return drjax.reduce_sum(summed)

        return program(clients)

    args = (state.params, model.frozen, clients, inputs)
    a = jax.tree.leaves(ours(*args)[0])
    b = jax.tree.leaves(with_drjax(*args))
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b, strict=True))
    same = all(bool(jnp.all(x == y)) for x, y in zip(a, b, strict=True))
    print(f"max |ours - drjax| over the round's sums: {diff:.3e}; bit-identical: {same}")
    for name, fn in (("ours (shard_map + fixed-order sum)", ours), ("drjax", with_drjax)):
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(fn(*args))
        ms = (time.perf_counter() - start) / repeats * 1e3
        print(f"{name}: {ms:.2f} ms per round body ({repeats} repeats)")


if __name__ == "__main__":
    main()
