"""SST-2 (2 classes) with DistilBERT-base, 10 of 100 clients per round (the release's setting;
the paper's main table uses RoBERTa-large: --config.model.name=roberta-large).

    python -m spry_jax.main --config=experiments/sst2.py --workdir=runs/sst2
    python -m spry_jax.main --config=experiments/sst2.py:local --workdir=runs/sst2_local

``:local``: the offline Rotten Tomatoes snippets (SST-2's source family) with MiniLM-L6; 3 rounds
on a CPU, accuracy around the majority class (0.56) to a little above.
"""

from spry_jax.config import check_variant, default_config, local_variant, paper_setting


def get_config(variant: str = ""):
    check_variant(variant)
    c = paper_setting(
        default_config(),
        dataset="sst2",
        model="distilbert-base",
        clients_per_round=10,
        num_clients=100,
    )
    if variant == "local":
        local_variant(c, dataset="rotten_tomatoes", model="minilm", pooling="mean")
    return c
