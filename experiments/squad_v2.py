"""SQuAD v2 (extractive QA) with OPT-6.7B on a 4-bit base, 10 of 500 clients per round,
sequence 384, split by article title (OPT-13B: --config.model.name=opt-13b).

Split by title the way the paper splits every dataset, with the title in the label's place
(Panchal et al., NeurIPS 2024: SQuAD v2 is split by article title instead of label): ``data.partition='group_dirichlet'``, a Dirichlet(alpha = 1) over the
article titles with equal client sizes (``floor(N / 500)`` questions, one more for the first
``N mod 500``), every question in exactly one client. A title's questions may span clients:
SQuAD v2 has 477 titles (train + validation), fewer than the paper's 500 clients, so one
client per title (``'natural'``) cannot build this setting, and dealing whole titles would
leave some clients empty.

    python -m spry_jax.main --config=experiments/squad_v2.py --workdir=runs/squad_v2
    python -m spry_jax.main --config=experiments/squad_v2.py:local --workdir=runs/squad_local

Evaluation reports SQuAD v2 exact match and F1 (n-best post-processing) of the global model.
``:local``: a randomly initialised 2-layer OPT on the small hand-written SQuAD-format file that
ships with the package (``spry_jax/resources/squad_tiny.json``), tokenized with the MiniLM
tokenizer (pipeline check only).
"""

from spry_jax import resources
from spry_jax.config import check_variant, default_config, local_variant, paper_setting


def get_config(variant: str = ""):
    check_variant(variant)
    c = paper_setting(
        default_config(),
        dataset="squad_v2",
        model="opt-6.7b",
        clients_per_round=10,
        num_clients=500,
        max_length=384,
    )
    c.data.partition = "group_dirichlet"
    c.model.quant = "int4"
    if variant == "local":
        local_variant(
            c,
            dataset="squad_json",
            model="opt-6.7b",
            pretrained=False,
            tokenizer="minilm",
            quant="none",
            overrides={
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "ffn_dim": 64,
                "num_attention_heads": 4,
                "word_embed_proj_dim": 32,
                "vocab_size": 30522,
            },
        )
        c.data.path = resources.path("squad_tiny.json")
        c.data.max_length = 128
        c.data.qa_stride = 32
        c.num_clients = 2
        c.clients_per_round = 2
        c.client.batch_size = 4
    return c
