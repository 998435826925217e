"""FuseGPT on the embedded SmolLM2-135M with a tiny budget (marked ``real``; under a minute)."""

from __future__ import annotations

import pytest
import torch

from fusegpt import FuseGPTConfig, compress, load_model

pytestmark = pytest.mark.real


def test_fusegpt_real_model_small_budget():
    model, tok = load_model()
    cfg = FuseGPTConfig(sparsity=0.03, preset="cpu", epochs=2, ft_nsamples=4, ft_seqlen=64, group_size=4,
                        lora_rank=4, coef_rank=4).with_overrides(nsamples=2, seqlen=64)
    model, report = compress(model, tok, cfg)
    assert model.config.num_hidden_layers == 29 and len(report.removed) == 1
    for g in report.steps[0].details["groups"]:
        assert g["loss_per_epoch"][-1] < g["loss_start"]  # training reduces the group's output error
    ids = tok("Pruning keeps the model small.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
