"""spry_jax: Spry (memory-efficient federated fine-tuning with forward gradients) in JAX."""

from setuptools import find_packages, setup

setup(
    name="spry_jax",
    version="0.1.0",
    description="Spry: weight-split forward-gradient federated fine-tuning of language models, in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["spry_jax", "spry_jax.*"]),
    # Small files read through importlib.resources (spry_jax.resources.path).
    package_data={"spry_jax.resources": ["*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.45",
        "datasets>=3.0",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
    ],
    # The base install is what the quickstart needs (no PyTorch). Extras: "gguf" reads GGUF
    # checkpoints (the smollm2 asset); "test" adds the test suite's tools and PyTorch, which the
    # tests use for parity against transformers' PyTorch models (the package never imports it).
    extras_require={
        "gguf": ["gguf>=0.10"],
        "test": [
            "gguf>=0.10",
            "pytest>=8",
            "pytest-xdist>=3.5",
            "filelock>=3.12",  # xdist workers share one smoke-study run (tests/test_study.py)
            "ruff>=0.6",
            "torch==2.13.0",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
    },
)
