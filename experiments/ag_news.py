"""AG News (4 classes) with RoBERTa-large, 100 of 1000 clients per round (the Spry paper's
setting, Panchal et al., NeurIPS 2024).

    python -m spry_jax.main --config=experiments/ag_news.py --workdir=runs/ag_news
    python -m spry_jax.main --config=experiments/ag_news.py:local --workdir=runs/ag_news_local

Needs the hub (or a local copy: --config.data.path, --config.model.name=DIR). Paper: Spry
generalized accuracy within a few points of FedYogi backprop after 1500 rounds on a GPU.
``:local`` runs the same method on the offline BBC News topics with MiniLM-L6 (3 rounds, a few
CPU minutes); expect accuracy above the 5-class chance level of 0.2, not the paper's number.
"""

from spry_jax.config import check_variant, default_config, local_variant, paper_setting


def get_config(variant: str = ""):
    check_variant(variant)
    c = paper_setting(
        default_config(),
        dataset="ag_news",
        model="roberta-large",
        clients_per_round=100,
        num_clients=1000,
    )
    if variant == "local":
        local_variant(c, dataset="bbc_news", model="minilm", pooling="mean")
    return c
