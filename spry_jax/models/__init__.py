"""Flax NNX language models with Hugging Face weights, PEFT and a quantised frozen base."""
