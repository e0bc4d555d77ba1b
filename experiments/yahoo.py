"""Yahoo Answers topics (10 classes) with DistilBERT-base, 10 of 1000 clients per round.

    python -m spry_jax.main --config=experiments/yahoo.py --workdir=runs/yahoo
    python -m spry_jax.main --config=experiments/yahoo.py:local --workdir=runs/yahoo_local

``:local``: BBC News (5 topics) with MiniLM-L6 on a CPU, 3 rounds.
"""

from spry_jax.config import check_variant, default_config, local_variant, paper_setting


def get_config(variant: str = ""):
    check_variant(variant)
    c = paper_setting(
        default_config(),
        dataset="yahoo_answers_topics",
        model="distilbert-base",
        clients_per_round=10,
        num_clients=1000,
    )
    if variant == "local":
        local_variant(c, dataset="bbc_news", model="minilm", pooling="mean")
    return c
