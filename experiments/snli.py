"""SNLI (3 classes, premise/hypothesis pairs) with BERT-large, 10 of 1000 clients per round
(the Spry paper's setting, Panchal et al., NeurIPS 2024).

    python -m spry_jax.main --config=experiments/snli.py --workdir=runs/snli
    python -m spry_jax.main --config=experiments/snli.py:local --workdir=runs/snli_local

``:local``: no offline NLI data exists here, so it runs the same method and model family (a
randomly initialised 2-layer BERT) on Rotten Tomatoes to check the pipeline on a CPU; its
accuracy says nothing about SNLI.
"""

from spry_jax.config import check_variant, default_config, local_variant, paper_setting


def get_config(variant: str = ""):
    check_variant(variant)
    c = paper_setting(
        default_config(), dataset="snli", model="bert-large", clients_per_round=10, num_clients=1000
    )
    if variant == "local":
        local_variant(
            c,
            dataset="rotten_tomatoes",
            model="bert-large",
            pretrained=False,
            tokenizer="minilm",
            overrides={
                "num_hidden_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "intermediate_size": 128,
            },
        )
    return c
