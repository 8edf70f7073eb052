"""The model helpers every stage shares: building models and loading their checkpoints."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from shared.models import load_tensors, model_from_config, model_tensors


def test_checkpoints_with_gelu_new_load_with_the_fused_gelu_and_compute_the_same():
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    assert config.activation_function == "gelu_new"
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(config).eval()
    loaded = model_from_config(GPT2Config.from_dict(config.to_dict()))
    load_tensors(loaded, model_tensors(reference), "test checkpoint")
    loaded.eval()

    assert loaded.config.activation_function == "gelu_pytorch_tanh"
    act = "transformer.h.0.mlp.act"
    assert type(loaded.get_submodule(act)) is not type(reference.get_submodule(act))
    ids = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0
        )
