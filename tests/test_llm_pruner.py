"""LLM-Pruner: Taylor importance of coupled structures, kept end blocks, GQA rules, reload."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusegpt import LLMPrunerConfig, compress
from fusegpt.methods.llm_pruner import taylor_statistics
from fusegpt.models import get_adapter
from fusegpt.width import width_roles

from .conftest import ToyTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _calib() -> torch.Tensor:
    return torch.randint(1, 120, (3, 24), generator=torch.Generator().manual_seed(0))


def test_taylor_statistics_are_w_times_grad_per_row_and_column():
    model = tiny_model("llama")
    a = get_adapter(model)
    ids = _calib()
    stats = taylor_statistics(a, ids, "element", batch_size=2)  # two batches: the mean loss still
    vec = taylor_statistics(a, ids, "vector", batch_size=3)
    logits = model(ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    block = a.layers[2]
    roles = width_roles(a, block)
    grads = torch.autograd.grad(loss, [roles["q_proj"].weight, roles["down_proj"].weight])
    sal_q = roles["q_proj"].weight * grads[0]
    sal_d = roles["down_proj"].weight * grads[1]
    torch.testing.assert_close(stats[(id(block), "q_proj")], sal_q.abs().sum(1), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(stats[(id(block), "down_proj")], sal_d.abs().sum(0), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(vec[(id(block), "q_proj")], sal_q.sum(1).abs(), rtol=1e-4, atol=1e-9)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_unimportant_head_and_channel_go_and_end_blocks_stay(text_file):
    model = tiny_model("llama", num_hidden_layers=8)
    a = get_adapter(model)
    roles = width_roles(a, a.layers[3])
    with torch.no_grad():  # head 1 and FFN channel 5 of block 3 contribute nothing: zero salience
        roles["q_proj"].weight[16:32] = 0
        roles["o_proj"].weight[:, 16:32] = 0
        roles["gate_proj"].weight[5] = 0
        roles["up_proj"].weight[5] = 0
        roles["down_proj"].weight[:, 5] = 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, rep = compress(model, ToyTokenizer(), LLMPrunerConfig(sparsity=0.25, calib_source=text_file, nsamples=4,
                                                                 seqlen=32, keep_first=2, keep_last=1))
    layers = rep.steps[0].details["layers"]
    assert 1 in layers[3]["removed_heads"]
    assert [x["params"][0] == x["params"][1] for x in layers] == [True, True] + [False] * 5 + [True]
    kept_ffn = a.intermediate_size(a.layers[3])
    assert kept_ffn < 96 and not any(torch.equal(before["model.layers.3.mlp.up_proj.weight"][5], row)
                                     for row in width_roles(a, a.layers[3])["up_proj"].weight)
    for n, p in model.named_parameters():
        if n.startswith(("model.layers.0.", "model.layers.1.", "model.layers.7.")):
            assert torch.equal(p, before[n]), n  # kept blocks untouched
    assert abs(rep.steps[0].details["sparsity_achieved"] - 0.25) < 0.01


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("taylor", ["element", "vector"])
def test_llm_pruner_reloads_with_identical_logits(tmp_path, text_file, family, taylor):
    from fusegpt import load_pruned, save_pruned

    model = tiny_model(family, num_hidden_layers=6)
    cfg = LLMPrunerConfig(sparsity=0.2, calib_source=text_file, nsamples=4, seqlen=32, taylor=taylor, keep_first=1,
                          keep_last=1)
    model, rep = compress(model, ToyTokenizer(), cfg)
    out = save_pruned(model, None, tmp_path / "ck", rep)
    back, _ = load_pruned(out)
    ids = _calib()[:1]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_refusals(text_file, tmp_path):
    from fusegpt.offload.layerwise import attach
    from fusegpt.settings import ConfigError

    with pytest.raises(ConfigError, match="taylor"):
        LLMPrunerConfig(taylor="second")
    with pytest.raises(ConfigError, match="leave none"):
        compress(tiny_model("llama"), ToyTokenizer(), LLMPrunerConfig(sparsity=0.2, calib_source=text_file, nsamples=2,
                                                                      seqlen=16, keep_first=4, keep_last=2))
    model = tiny_model("llama")
    attach(model, "cpu", "disk", tmp_path / "store")
    with pytest.raises(ValueError, match="does not run layer-wise"):
        compress(model, ToyTokenizer(), LLMPrunerConfig(sparsity=0.2, calib_source=text_file, nsamples=2, seqlen=16,
                                                        keep_first=1, keep_last=1))


def test_cli_llm_pruner(tiny_checkpoint, tmp_path):
    import json

    from fusegpt.cli import main

    path, text = tiny_checkpoint
    assert main(["prune", "--model", str(path), "--method", "llm-pruner", "--sparsity", "0.2", "--calib", str(text),
                 "--set", "keep_first=1", "--set", "keep_last=1", "--output", str(tmp_path / "lp"), "--no-eval"]) == 0
    rep = json.loads((tmp_path / "lp" / "report.json").read_text())
    assert rep["steps"][0]["details"]["taylor"] == "element"
    assert abs(rep["steps"][0]["details"]["sparsity_achieved"] - 0.2) < 0.01


@pytest.mark.real
def test_llm_pruner_on_the_embedded_model(tmp_path):
    from fusegpt import EvalConfig, evaluate, load_model, load_pruned, save_pruned

    model, tok = load_model()
    model, rep = compress(model, tok, LLMPrunerConfig(sparsity=0.2, calib_source="news"))
    d = rep.steps[0].details
    # the cpu preset aligns widths to 128 channels: the target is met to within one such step of one layer
    assert 0.2 <= d["sparsity_achieved"] < 0.2 + 128 * 3 * 576 / 106e6
    assert all(x["ffn"][1] % 128 == 0 for x in d["layers"])
    assert all(x["params"][0] == x["params"][1] for x in d["layers"][:4] + d["layers"][-2:])
    ppl = evaluate(model, tok, EvalConfig(data=("wiki",), seqlen=256, max_tokens=1024))["wiki"]
    assert ppl < 200, ppl  # measured 20% on 16,384 tokens: see benchmarks/RESULTS.md
    back, _ = load_pruned(save_pruned(model, tok, tmp_path / "lp", rep))
    ids = tok("The history of the city begins", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
