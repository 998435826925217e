"""SlimGPT: OBS math, GQA/MHA width pruning across families, schedules, budgets, checkpoints, chains."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from fusegpt import (
    ConfigError,
    MagnitudeWidthConfig,
    MIConfig,
    SlimGPTConfig,
    compress,
    load_pruned,
    save_pruned,
)
from fusegpt.checkpoint.width import MARKER_MODEL_TYPE
from fusegpt.models import get_adapter
from fusegpt.obs import HessianError, OBSLayer, group_sizes
from fusegpt.width import WIDTH_SCHEDULES, decoder_params, plan_widths

from .conftest import ToyTokenizer, tiny_model

CALIB = dict(calib_source="wiki", nsamples=2, seqlen=32)


def _layer_and_inputs(out=6, cols=12, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(cols, out, bias=False)
    lin.weight.data = torch.randn(out, cols, generator=g, dtype=torch.float64).float()
    mix = torch.randn(cols, cols, generator=g)
    x = torch.randn(n, cols, generator=g) @ mix  # correlated inputs: compensation has something to use
    return lin, x


def _obs(lin, x, percdamp=0.0):
    obs = OBSLayer(lin, "test", percdamp=percdamp)
    obs.add_batch(x[:150])
    obs.add_batch(x[150:])  # running mean over batches == one batch
    return obs


def test_hessian_is_running_mean_of_2xxT():
    lin, x = _layer_and_inputs()
    obs = _obs(lin, x)
    torch.testing.assert_close(obs.H, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)


def test_obs_compensation_reduces_error_and_matches_prediction():
    lin, x = _layer_and_inputs()
    W0 = lin.weight.data.clone()
    obs = _obs(lin, x)
    cols = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    removed, err = obs.prune_units(cols, [[1]])  # remove unit 1 (columns 3-5), compensate the rest
    assert removed == [1]
    W1 = lin.weight.data
    assert torch.all(W1[:, 3:6] == 0)
    naive = W0.clone()
    naive[:, 3:6] = 0
    err_comp = ((W0 - W1) @ x.t()).pow(2).sum() * 2 / x.shape[0]
    err_naive = ((W0 - naive) @ x.t()).pow(2).sum() * 2 / x.shape[0]
    assert err_comp < 0.9 * err_naive
    assert abs(float(err_comp) - err) / err < 1e-3  # the OBS error is the actual output error (percdamp=0)


def test_grouped_cholesky_error_equals_direct_formula():
    lin, x = _layer_and_inputs()
    obs = _obs(lin, x, percdamp=0.01)
    Hinv = obs.inverse()
    W = lin.weight.data.float()
    units = [torch.tensor([0, 1, 2]), torch.tensor([6, 7, 8])]
    alive = torch.ones(12, dtype=torch.bool)
    gcd = OBSLayer.unit_errors(W, Hinv, units, alive, gcd=True)
    for u, e in zip(units, gcd, strict=True):
        direct = OBSLayer.set_error(W, Hinv, u)  # Σ_rows w_M (H⁻¹_MM)⁻¹ w_Mᵀ
        assert abs(float(e) - direct) / direct < 1e-5
    per_col = OBSLayer.unit_errors(W, Hinv, units, alive, gcd=False)  # −GCD: an approximation
    assert per_col.shape == gcd.shape and torch.all(per_col > 0)


def test_greedy_picks_least_error_unit():
    lin, x = _layer_and_inputs(seed=3)
    lin.weight.data[:, 6:9] *= 1e-3  # unit 2 is almost free to remove
    obs = _obs(lin, x, percdamp=0.01)
    removed, _ = obs.prune_units([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]], [[0, 1, 2, 3]])
    assert removed == [2]


def test_dynamic_group_sizes():
    assert list(group_sizes(300)) == [150, 75, 64, 11]
    assert list(group_sizes(40)) == [40]
    big = list(group_sizes(3000))
    assert big[:6] == [1024, 750, 375, 187, 93, 64] and sum(big) == 3000 and max(big[5:]) == 64
    assert list(group_sizes(300, dgs=False, group_max=128)) == [128, 128, 44]


def test_channel_pruning_compensates():
    lin, x = _layer_and_inputs(cols=40)
    W0 = lin.weight.data.clone()
    obs = _obs(lin, x, percdamp=0.01)
    gone, _ = obs.prune_channels(15, group_min=4)
    assert len(set(gone)) == 15
    naive = W0.clone()
    naive[:, gone] = 0
    assert ((W0 - lin.weight.data) @ x.t()).pow(2).sum() < ((W0 - naive) @ x.t()).pow(2).sum()


def test_hessian_not_pd_names_the_setting():
    lin, _ = _layer_and_inputs()
    obs = OBSLayer(lin, "block 3 o_proj", percdamp=0.01)
    obs.add_batch(torch.zeros(50, 12))  # dead inputs: H = 0, dampening adds nothing
    with pytest.raises(HessianError, match="percdamp"):
        obs.inverse()


@pytest.mark.parametrize("mha", [False, True], ids=["gqa", "mha"])
def test_slimgpt_families(family, mha):
    kw = {"num_key_value_heads": 4} if mha else {}
    model = tiny_model(family, **kw)
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    before = decoder_params(get_adapter(model))
    model, report = compress(model, ToyTokenizer(), SlimGPTConfig(sparsity=0.3, **CALIB))
    adapter = get_adapter(model)
    after = decoder_params(adapter)
    assert abs((1 - after / before) - 0.3) < 0.01
    d = report.steps[0].details
    assert d["head_rule"] == (["kv_groups"] if mha else ["equal_per_group"])
    assert len(d["layers"]) == 6 and all({"ratio", "heads", "ffn", "kv_heads"} <= set(x) for x in d["layers"])
    for block in adapter.layers:
        h, kv = adapter.num_heads(block), adapter.num_kv_heads(block)
        assert h % kv == 0 and (mha or kv == 2)
    ratios = [x["ratio_target"] for x in d["layers"]]
    assert ratios == sorted(ratios) and ratios[0] == 0.0  # log-increase from r_min = 0
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("schedule", WIDTH_SCHEDULES)
@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_schedules_meet_target(schedule, sparsity):
    adapter = get_adapter(tiny_model("llama", intermediate_size=512))
    plan = plan_widths(adapter, SlimGPTConfig(sparsity=sparsity, schedule=schedule, align=1).resolve())
    assert abs(plan.achieved - sparsity) < 0.003  # free widths: the target to within a channel per layer
    aligned = plan_widths(adapter, SlimGPTConfig(sparsity=sparsity, schedule=schedule).resolve())  # cpu: align 128
    assert sparsity <= aligned.achieved < sparsity + 0.06 and all(p.ffn[1] % 64 == 0 for p in aligned.layers)
    ratios = [p.ratio_target for p in plan.layers]
    if schedule.endswith("increase"):
        assert ratios == sorted(ratios)
    elif schedule.endswith("decrease"):
        assert ratios == sorted(ratios, reverse=True)
    else:
        assert max(ratios) - min(ratios) < 1e-9


def test_impossible_budgets_are_rejected_up_front():
    adapter = get_adapter(tiny_model("llama"))
    with pytest.raises(ConfigError, match="not reachable"):
        plan_widths(adapter, SlimGPTConfig(sparsity=0.9, max_layer_ratio=0.95).resolve())
    mha = get_adapter(tiny_model("llama", num_key_value_heads=4))
    with pytest.raises(ConfigError, match="head_rule=kv_groups"):
        plan_widths(mha, SlimGPTConfig(sparsity=0.3, head_rule="equal_per_group").resolve())
    with pytest.raises(ConfigError, match="max_layer_ratio"):
        SlimGPTConfig(sparsity=0.95)
    with pytest.raises(ConfigError, match="schedule"):
        SlimGPTConfig(schedule="cosine")


def test_magnitude_baseline_runs_without_compensation():
    model = tiny_model("qwen2")
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    model, report = compress(model, ToyTokenizer(), MagnitudeWidthConfig(sparsity=0.3, **CALIB))
    assert report.steps[0].method == "magnitude"
    o = get_adapter(model).linear_roles(get_adapter(model).layers[5])["o_proj"].weight
    kept = report.steps[0].details["layers"][5]
    heads = [h for h in range(4) if h not in kept.get("removed_heads", [])]
    cols = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in heads])
    assert torch.equal(o, ref["model.layers.5.self_attn.o_proj.weight"][:, cols])  # no OBS update


@pytest.mark.parametrize("fam,rule", [("llama", "auto"), ("qwen2", "kv_groups")])
def test_checkpoint_reload_identical_and_generates(fam, rule, tmp_path):
    model = tiny_model(fam)
    model, report = compress(model, ToyTokenizer(), SlimGPTConfig(sparsity=0.4, head_rule=rule, **CALIB))
    out = save_pruned(model, ToyTokenizer(), tmp_path / "w", report)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == MARKER_MODEL_TYPE and cfg["fusegpt_widths"]["model_type"] == fam
    assert cfg["fusegpt_widths"]["intermediate_size"] == [x["ffn"][1] for x in report.steps[0].details["layers"]]
    reloaded, tok = load_pruned(out)
    assert tok is None  # the toy tokenizer saves nothing
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
        g_cache = reloaded.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, use_cache=True)
        g_plain = reloaded.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, use_cache=False)
    assert g_cache.shape == (1, 14) and torch.equal(g_cache, g_plain)
    with pytest.raises(ValueError, match="fusegpt.load_pruned"):
        AutoModelForCausalLM.from_pretrained(out)


def test_chain_depth_then_width_one_report(tmp_path):
    model = tiny_model("llama")
    start = decoder_params(get_adapter(model))
    chain = [MIConfig(sparsity=0.2, **CALIB), SlimGPTConfig(sparsity=0.5, **CALIB)]
    model, report = compress(model, ToyTokenizer(), chain)
    assert [s.method for s in report.steps] == ["mi", "slimgpt"]
    assert report.layers_after == 4
    assert abs((1 - decoder_params(get_adapter(model)) / start) - 0.5) < 0.01  # total target, from the start
    assert report.steps[1].details["decoder_params"]["start"] == start
    out = save_pruned(model, ToyTokenizer(), tmp_path / "chain", report)
    reloaded, _ = load_pruned(out)
    ids = torch.randint(1, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    with pytest.raises(ConfigError, match="already remove"):
        compress(tiny_model("llama"), ToyTokenizer(), [MIConfig(sparsity=0.5, **CALIB), SlimGPTConfig(sparsity=0.4, **CALIB)])


def test_cli_prune_and_eval_width_checkpoint(tiny_checkpoint, tmp_path, capsys):
    from fusegpt.cli import main

    path, text = tiny_checkpoint
    out = tmp_path / "cli"
    rc = main(["-q", "prune", "--model", str(path), "--method", "slimgpt", "--sparsity", "0.25", "--calib", str(text),
               "--nsamples", "4", "--seqlen", "32", "--set", "schedule=uniform", "--output", str(out), "--no-eval"])
    assert rc == 0 and (out / "report.json").is_file()
    rc = main(["eval", "--model", str(out), "--data", str(text), "--seqlen", "32", "--max-tokens", "256", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["ppl"][str(text)] > 1


@pytest.mark.parametrize("fam,kw,rule", [("llama", {}, "auto"), ("qwen3", {}, "kv_groups"),
                                         ("qwen2", {"num_key_value_heads": 4}, "auto")])
def test_surgery_equals_masking(fam, kw, rule):
    """Without compensation, removing heads/channels == zeroing their o_proj/down_proj columns."""
    model, ref = tiny_model(fam, **kw), tiny_model(fam, **kw)
    model, rep = compress(model, ToyTokenizer(), MagnitudeWidthConfig(sparsity=0.4, head_rule=rule, **CALIB))
    a, p = get_adapter(ref), get_adapter(model)
    d = a.head_dim
    for block, pruned, info in zip(a.layers, p.layers, rep.steps[0].details["layers"], strict=True):
        r = a.linear_roles(block)
        for h in info.get("removed_heads", []):
            r["o_proj"].weight.data[:, h * d:(h + 1) * d] = 0
        full_up = r["up_proj"].weight.data
        kept = [int((full_up == row).all(1).nonzero()[0]) for row in p.linear_roles(pruned)["up_proj"].weight.data]
        gone = torch.ones(full_up.shape[0], dtype=torch.bool)
        gone[kept] = False
        r["down_proj"].weight.data[:, gone] = 0
    ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["slimgpt", "magnitude", "llm-pruner"])
def test_aligned_widths_are_multiples_and_meet_the_budget(method):
    """align=32: every kept FFN width and heads × head_dim is a multiple of 32 (or unpruned); the
    units are still the method's choice (OBS-compensated for SlimGPT), the budget still met."""
    from fusegpt import config_for

    model = tiny_model("llama", intermediate_size=320)  # 10 multiples of 32: the alignment is used as given
    extra = {"keep_first": 1, "keep_last": 1} if method == "llm-pruner" else {}
    model, report = compress(model, ToyTokenizer(), config_for(method, sparsity=0.3, align=32, **CALIB, **extra))
    d = report.steps[0].details
    a = get_adapter(model)
    for b in a.layers:
        ffn, heads = a.intermediate_size(b), a.num_heads(b)
        assert ffn % 32 == 0 or ffn == 320, ffn
        assert (heads * a.head_dim) % 32 == 0 or heads == 4
    assert d["sparsity_achieved"] >= 0.3 and any(x["ffn"][1] < 320 for x in d["layers"])
    unaligned = compress(tiny_model("llama", intermediate_size=320), ToyTokenizer(),
                         config_for(method, sparsity=0.3, align=1, **CALIB, **extra))[1].steps[0].details
    assert any(x["ffn"][1] % 32 for x in unaligned["layers"])  # the test's model does need the rounding


def test_alignment_halves_for_a_narrow_ffn():
    from fusegpt.width.plan import effective_align

    assert effective_align(128, 1536) == 128 and effective_align(128, 11008) == 128  # SmolLM2, LLaMA-2-7B
    assert effective_align(128, 512) == 64 and effective_align(128, 96) == 8 and effective_align(1, 96) == 1


def test_layout_uniform_refusals():
    from fusegpt import config_for

    with pytest.raises(ConfigError, match="schedule=log_increase"):
        config_for("slimgpt", sparsity=0.3, layout="uniform", schedule="log_increase")
    with pytest.raises(ConfigError, match="keep_first"):
        config_for("llm-pruner", sparsity=0.3, layout="uniform", keep_first=2).resolve("cpu")
    cfg = config_for("llm-pruner", sparsity=0.3, layout="uniform").resolve("cpu")
    assert cfg.keep_first == 0 and cfg.origins["keep_first"] == "layout uniform"
    model = tiny_model("llama")
    model, _ = compress(model, ToyTokenizer(), config_for("slimgpt", sparsity=0.3, **CALIB))  # per-layer widths
    with pytest.raises(ConfigError, match="equal widths"):
        compress(model, ToyTokenizer(), config_for("slimgpt", sparsity=0.5, layout="uniform", **CALIB))
