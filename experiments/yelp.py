"""Yelp polarity (2 classes) with ALBERT-large, 10 of 1000 clients per round.

ALBERT shares one layer's weights across depth, so LoRA on query/value gives only 3 units (two
shared adapters and the head): the release could not split it and ran FedFGD (forward gradients
on all trainable weights), which is this config's method.

    python -m spry_jax.main --config=experiments/yelp.py --workdir=runs/yelp
    python -m spry_jax.main --config=experiments/yelp.py:local --workdir=runs/yelp_local

``:local``: a randomly initialised 2-layer ALBERT on Rotten Tomatoes (pipeline check on a CPU).
"""

from spry_jax.config import check_variant, default_config, local_variant, paper_setting


def get_config(variant: str = ""):
    check_variant(variant)
    c = paper_setting(
        default_config(),
        dataset="yelp_polarity",
        model="albert-large",
        clients_per_round=10,
        num_clients=1000,
    )
    c.method = "fedfgd"
    if variant == "local":
        local_variant(
            c,
            dataset="rotten_tomatoes",
            model="albert-large",
            pretrained=False,
            tokenizer="minilm",
            overrides={
                "num_hidden_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "intermediate_size": 128,
                "embedding_size": 32,
            },
        )
    return c
