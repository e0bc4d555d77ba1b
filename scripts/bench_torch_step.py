"""One client step, ours vs PyTorch's (Spry's jvp step and backprop), each side in its own process.

    python scripts/bench_torch_step.py --models=minilm,bert-base --methods=spry,fedavg --cpus=0,1

Details: :mod:`spry_jax.bench.steps`.
"""

from spry_jax.bench import steps

if __name__ == "__main__":
    steps.main()
