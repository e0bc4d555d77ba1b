"""Loads checkpoints quantised and packed by AutoGPTQ itself and compares with AutoGPTQ's forward.

AutoGPTQ 0.7.1 (``pip install --no-deps auto-gptq==0.7.1``) runs its GPTQ algorithm
(``auto_gptq/quantization/gptq.py``: Hessian from calibration activations, act-order, groups)
and packs with its ``QuantLinear.pack`` (``auto_gptq/nn_modules/qlinear/qlinear_cuda.py``) on
CPU, but its package ``__init__`` no longer imports against transformers 5 (it needs
``transformers.modeling_utils.no_init_weights``). So this script loads just those two files
(plus ``quantizer.py``) from the installed package by path, quantises a tiny random Llama and
OPT, writes the checkpoint in the hub layout (``model.safetensors`` with ``qweight``,
``qzeros``, ``scales``, ``g_idx``; ``config.json`` with ``quantization_config``), loads it with
``spry_jax.models.from_pretrained`` and compares the logits with the same PyTorch model whose
Linear layers are replaced by AutoGPTQ's ``QuantLinear`` (its own unpacking and dequantisation,
the pure-PyTorch path, in float32).

    nice -n 19 python scripts/check_gptq_autogptq.py   # needs auto-gptq, torch, transformers
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import tempfile
import types

import numpy as np
import safetensors.numpy
import torch
import transformers


def _load_autogptq():
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("auto-gptq is not installed: pip install --no-deps auto-gptq==0.7.1")
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    pkg = types.ModuleType("agq")
    pkg.__path__ = [str(root / "quantization")]
    sys.modules["agq"] = pkg
    mods = {}
    for name, path in (
        ("agq.quantizer", root / "quantization" / "quantizer.py"),
        ("agq.gptq", root / "quantization" / "gptq.py"),
        ("agq_qlinear", root / "nn_modules" / "qlinear" / "qlinear_cuda.py"),
    ):
        s = importlib.util.spec_from_file_location(name, path)
        m = importlib.util.module_from_spec(s)
        sys.modules[name] = m
        s.loader.exec_module(m)
        mods[name] = m
    # fasterquant calls torch.cuda.synchronize() for its timing log; a no-op on CPU.
    torch.cuda.synchronize = lambda *a, **k: None
    return mods["agq.gptq"].GPTQ, mods["agq_qlinear"].QuantLinear


CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=1,
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=128,
        hidden_size=64,
        word_embed_proj_dim=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=1,
        dropout=0.0,
        attention_dropout=0.0,
    ),
}


def _quantise_and_save(family, out_dir, group, act_order, sym, GPTQ, QuantLinear, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.2 * torch.randn(p.shape, generator=gen)
                if "norm" in name
                else 0.2 * torch.randn(p.shape, generator=gen)
            )
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }
    gptqs = {n: GPTQ(m) for n, m in linears.items()}
    for g in gptqs.values():
        g.quantizer.configure(4, perchannel=True, sym=sym, mse=False)
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, n=n: gptqs[n].add_batch(inp[0].data, out.data)
        )
        for n, m in linears.items()
    ]
    calib = torch.randint(3, 128, (16, 24), generator=gen)
    with torch.no_grad():
        model(input_ids=calib)
    for h in hooks:
        h.remove()
    tensors, qlins = {}, {}
    for n, m in linears.items():
        scale, zero, g_idx = gptqs[n].fasterquant(
            percdamp=0.01, group_size=group, actorder=act_order
        )
        half = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None).half()
        half.weight.data = m.weight.data.half()
        if m.bias is not None:
            half.bias.data = m.bias.data.half()
        ql = QuantLinear(4, group, m.in_features, m.out_features, m.bias is not None)
        ql.pack(half, scale, zero, g_idx)
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            tensors[f"{n}.{part}"] = getattr(ql, part).numpy()
        if m.bias is not None:
            tensors[f"{n}.bias"] = ql.bias.detach().numpy()
        qlins[n] = ql
    skip = {f"{n}.{leaf}" for n in linears for leaf in ("weight", "bias")}
    for key, value in model.state_dict().items():
        if key in skip or (key == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        tensors[key] = value.numpy().astype(np.float16)
    safetensors.numpy.save_file(tensors, str(out_dir / "model.safetensors"), {"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = dict(
        quant_method="gptq",
        bits=4,
        group_size=group,
        desc_act=act_order,
        sym=sym,
        checkpoint_format="gptq",
    )
    (out_dir / "config.json").write_text(json.dumps(cfg))

    # AutoGPTQ's own forward: its QuantLinear in place of every Linear, float32 arithmetic
    # on the float16 values the checkpoint holds.
    for n, ql in qlins.items():
        ql.scales = ql.scales.float()
        if ql.bias is not None:
            ql.bias = ql.bias.float()
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, ql)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key in tensors and value.is_floating_point():
                value.copy_(torch.from_numpy(tensors[key].astype(np.float32)))
    return model


def main() -> None:
    from spry_jax import models
    from spry_jax.models.layers import Linear
    from spry_jax.models.peft import iter_modules

    GPTQ, QuantLinear = _load_autogptq()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, size=(3, 12))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    worst = 0.0
    for family in ("llama", "opt"):
        for group, act_order, sym in ((32, True, False), (32, False, True), (-1, True, True)):
            with tempfile.TemporaryDirectory() as tmp:
                ref = _quantise_and_save(
                    family, pathlib.Path(tmp), group, act_order, sym, GPTQ, QuantLinear
                )
                ours = models.from_pretrained(tmp, task="causal_lm")
                got = np.asarray(ours(ids, mask))
                lins = [
                    m for _, m in iter_modules(ours) if isinstance(m, Linear) and m.quant == "int4"
                ]
                permuted = sum(m.input_perm is not None for m in lins)
                zeros = sum(m.kernel_zero is not None for m in lins)
            with torch.no_grad():
                want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
            keep = mask.astype(bool)
            err = float(np.abs(got[keep] - want.numpy()[keep]).max() / np.abs(want.numpy()).max())
            worst = max(worst, err)
            print(
                f"{family:5s} group={group:3d} act_order={act_order!s:5s} sym={sym!s:5s} "
                f"layers permuted {permuted}/{len(lins)}, with zero points {zeros}/{len(lins)}; "
                f"max rel err vs AutoGPTQ QuantLinear: {err:.2e}"
            )
    print(f"worst {worst:.2e}")
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main()
