"""SlimGPT on the embedded SmolLM2-135M (marked ``real``; about a minute on 2 idle CPU cores)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fusegpt import (
    EvalConfig,
    MagnitudeWidthConfig,
    SlimGPTConfig,
    compress,
    evaluate,
    load_model,
    load_pruned,
    save_pruned,
)
from fusegpt.methods.slimgpt.config import CPU_ALIGN

pytestmark = pytest.mark.real

CALIB = dict(calib_source="news", nsamples=2, seqlen=256)
EVAL = EvalConfig(data=("wiki",), seqlen=256, max_tokens=1024)


def test_slimgpt_beats_magnitude_and_reloads(tmp_path):
    model, tok = load_model()
    model, rep = compress(model, tok, SlimGPTConfig(sparsity=0.2, **CALIB))
    d = rep.steps[0].details
    # The cpu preset aligns widths to 128 channels (CPU_ALIGN): the budget is met, and the plan hands
    # aligned steps back until the overshoot is under one layer's step (128 channels x gate/up/down rows).
    assert SlimGPTConfig(sparsity=0.2).resolve("cpu").align == CPU_ALIGN == 128
    step = CPU_ALIGN * 3 * model.config.hidden_size / d["decoder_params"]["start"]
    assert 0.2 <= d["sparsity_achieved"] < 0.2 + step, (d["sparsity_achieved"], step)
    assert all(x["ffn"][1] % CPU_ALIGN == 0 or x["ffn"][1] == x["ffn"][0] for x in d["layers"])
    assert {x["heads"][1] for x in d["layers"]} <= {3, 6, 9} and all(x["kv_heads"][1] == 3 for x in d["layers"])
    slim = evaluate(model, tok, EVAL)["wiki"]
    base, _ = load_model()
    base, _ = compress(base, tok, MagnitudeWidthConfig(sparsity=0.2))
    mag = evaluate(base, tok, EVAL)["wiki"]
    assert slim < mag, (slim, mag)

    out = save_pruned(model, tok, tmp_path / "slim", rep)
    reloaded, tok2 = load_pruned(out)
    assert tok2 is not None
    ids = tok("The history of the city begins", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
        gen = reloaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 6
    with pytest.raises(ValueError, match="fusegpt.load_pruned"):
        AutoModelForCausalLM.from_pretrained(out)
