"""spry_jax: Spry federated fine-tuning with forward gradients, in JAX."""

__version__ = "0.1.0"
