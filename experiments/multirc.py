"""MultiRC (2 classes) with Llama2-7B on a 4-bit base, 10 of 100 clients per round.

The paper's run used a 4-bit GPTQ base with float32 compute; here the frozen base is int4
weight-only quantised (``model.quant='int4'``) and dequantised inside each layer.

    python -m spry_jax.main --config=experiments/multirc.py --workdir=runs/multirc
    python -m spry_jax.main --config=experiments/multirc.py:local --workdir=runs/multirc_local

``:local``: SmolLM2-135M (a Llama, from the offline GGUF asset, int4 base) classifying Rotten
Tomatoes on a CPU, 3 rounds.
"""

from spry_jax.config import check_variant, default_config, local_variant, paper_setting


def get_config(variant: str = ""):
    check_variant(variant)
    c = paper_setting(
        default_config(),
        dataset="multirc",
        model="llama2-7b",
        clients_per_round=10,
        num_clients=100,
    )
    c.model.quant = "int4"
    if variant == "local":
        local_variant(c, dataset="rotten_tomatoes", model="smollm2")
        c.data.max_examples = 400
        c.client.batch_size = 4
        c.client.max_steps = 2
    return c
