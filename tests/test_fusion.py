"""FuseGPT: fused linear maths, groups, losses, end to end per family, resume, divergence."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fusegpt import ConfigError, FuseGPTConfig, MIFTConfig, api, config_for
from fusegpt.fusion import FusedLinear, frozen_weight, group_window, kl_batch_loss, make_loss, merge_fused
from fusegpt.fusion import group_training as fusion_train
from fusegpt.methods.fusegpt import loop as fusion
from fusegpt.models import get_adapter

from .conftest import FAMILIES, ToyTokenizer, tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread (and do not fight other jobs for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- fused linear


def _linear(out_f=12, in_f=10, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _perturb(fl: FusedLinear, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lora, coef = fl.trainable()
        for p in (*lora, *coef):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_zero_init_equals_own_weight():
    lin, p = _linear(), _linear(seed=1)
    fl = FusedLinear.from_linear(lin, lora_rank=4)
    fl.add_term(*frozen_weight(p), rank=3)
    x = torch.randn(5, 10)
    torch.testing.assert_close(fl(x), lin(x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(fl(x), lin(x), rtol=0, atol=0)


def test_fused_forward_formula_and_merge():
    lin, p = _linear(), _linear(seed=1)
    fl = FusedLinear.from_linear(lin, lora_rank=4)
    term = fl.add_term(*frozen_weight(p), rank=3)
    _perturb(fl)
    w = lin.weight + fl.lora_B @ fl.lora_A + (term.coef_C @ term.coef_D) * p.weight
    b = lin.bias + term.coef_b * p.bias
    x = torch.randn(5, 10)
    torch.testing.assert_close(fl(x), x @ w.T + b)
    merged = fl.to_linear()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), fl(x))


def test_materialise_fused_block_and_incremental_term():
    a, b, c = _linear(seed=0), _linear(seed=1), _linear(seed=2)
    fb = FusedLinear.from_linear(b, lora_rank=2)
    fb.add_term(*frozen_weight(c), rank=3)
    _perturb(fb, seed=3)
    w_b, bias_b = frozen_weight(fb)  # p was fused before: one frozen tensor
    assert not w_b.requires_grad
    torch.testing.assert_close(w_b, fb.effective_weight())
    fa = FusedLinear.from_linear(a, lora_rank=2)
    fa.add_term(*frozen_weight(_linear(seed=4)), rank=3)
    fa.add_term(w_b, rank=3, fused_bias=bias_b)  # a was fused before: a second term
    assert len(fa.terms) == 2
    _perturb(fa, seed=5)
    x = torch.randn(4, 10)
    before = fa(x)
    assert fa.merge_oldest(keep=1) == 1 and len(fa.terms) == 1
    torch.testing.assert_close(fa(x), before)
    # no-grad cache follows parameter updates
    with torch.no_grad():
        y0 = fa(x)
        fa.terms[0].coef_C.add_(1.0)
        assert not torch.allclose(fa(x), y0)


def test_shape_mismatch_is_an_error():
    fl = FusedLinear.from_linear(_linear(12, 10), lora_rank=2)
    with pytest.raises(ValueError, match="widths"):
        fl.add_term(torch.zeros(6, 10), rank=2)


def test_merge_fused_generic():
    seq = nn.Sequential(FusedLinear.from_linear(_linear(), 2), nn.ReLU())
    _perturb(seq[0])
    x = torch.randn(3, 10)
    y = seq(x)
    assert merge_fused(seq) == 1 and type(seq[0]) is nn.Linear
    torch.testing.assert_close(seq(x), y)


# ---------------------------------------------------------------- groups and losses


@pytest.mark.parametrize("p,expected", [(0, range(0, 8)), (3, range(0, 8)), (4, range(0, 8)), (10, range(6, 14)),
                                        (26, range(22, 30)), (29, range(22, 30))])
def test_group_window_edges(p, expected):
    g = group_window(p, 30, 8)
    assert g == list(expected) and p in g


def test_group_window_small_model():
    assert group_window(2, 5, 8) == [0, 1, 2, 3, 4]


def test_kl_batch_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    h, t = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    p, q = t.softmax(0), h.softmax(0)
    expected = (p * (p.log() - q.log())).sum() / 4
    torch.testing.assert_close(kl_batch_loss(h, t), expected)
    assert float(kl_batch_loss(t, t)) == pytest.approx(0, abs=1e-6)
    # the property measured to hurt: a shift common to the batch is invisible to it
    assert float(kl_batch_loss(t + 3.0, t)) == pytest.approx(0, abs=1e-5)
    assert float(make_loss("mse")(t + 3.0, t)) == pytest.approx(9.0)


def test_other_losses():
    t = torch.randn(2, 3, 8)
    for name in ("mse", "cosine", "mse+cosine"):
        assert float(make_loss(name)(t, t)) == pytest.approx(0, abs=1e-6)
    assert float(make_loss("cosine")(-t, t)) == pytest.approx(2.0)
    kl = make_loss("kl-logits", get_adapter(tiny_model("llama")))
    t = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert float(kl(t, t)) == pytest.approx(0, abs=1e-6) and float(kl(t + torch.randn_like(t), t)) > 0
    with pytest.raises(ValueError, match="choose from"):
        make_loss("nope")


# ---------------------------------------------------------------- configs


def test_presets_and_overrides():
    r = config_for("fusegpt", preset="cpu", epochs=7).resolve()
    assert r.preset == "cpu" and r.epochs == 7 and r.loss == "mse"
    assert (r.nsamples, r.seqlen) == (8, 256) and r.origins["epochs"] == "explicit"
    assert r.origins["loss"] == "preset cpu" and r.origins["mi_batch_size"] == "default"
    r = config_for("fusegpt", preset="paper", nsamples=16).resolve()
    assert r.loss == "kl-batch" and r.lr_base == 9.65e-6 and r.calib.nsamples == 16
    assert r.seqlen == 2048 and r.ft_nsamples == 128 and r.ft_source == "wiki"
    assert FuseGPTConfig().resolve("cuda").preset == "paper"
    assert FuseGPTConfig().resolve("cpu").preset == "cpu"
    assert FuseGPTConfig().resolve("cpu").origins["preset"] == "default for cpu"
    assert MIFTConfig(lr=3e-4).resolve().lr == 3e-4
    with pytest.raises(ConfigError, match="preset"):
        FuseGPTConfig(preset="fast")
    with pytest.raises(ConfigError, match="loss"):
        FuseGPTConfig(loss="kl")
    with pytest.raises(ConfigError, match="epochs"):
        MIFTConfig(epochs=0)


def test_explicit_values_win_even_when_equal_to_a_default():
    """The issue's reproduction: a preset must not override explicit values that equal old defaults."""
    r = FuseGPTConfig(sparsity=0.25, preset="cpu").with_overrides(nsamples=32, seqlen=2048).resolve()
    assert (r.nsamples, r.seqlen) == (32, 2048)
    assert r.origins["nsamples"] == r.origins["seqlen"] == "explicit"
    # resolving twice is a no-op; overriding a resolved config lets the preset fill again
    assert r.resolve() is r
    again = r.with_overrides(preset="paper").resolve()
    assert (again.nsamples, again.ft_nsamples) == (32, 128)


def test_cli_resume_keeps_state_beside_the_output(tmp_path):
    from fusegpt.runstate import RunContext, state_root_for

    root = state_root_for(tmp_path / "x")
    assert root == tmp_path / "x.state"
    ctx = RunContext(adapter=None, tokenizer=None, state_root=root, resume=True, step_index=1)
    assert ctx.state_dir("fusegpt") == root / "1-fusegpt"
    assert RunContext(adapter=None, tokenizer=None).state_dir("fusegpt") is None


# ---------------------------------------------------------------- end to end on tiny models

TINY_RUN = dict(sparsity=0.3, epochs=2, batch_size=2, ft_nsamples=4, ft_seqlen=16, group_size=4, lora_rank=4,
                coef_rank=4, nsamples=2, seqlen=16, loss="mse", lr_base=1e-3)


def _run(model, text_file, method="fusegpt", state_dir=None, resume=False, **kw):
    settings = {**TINY_RUN, "calib_source": text_file, **kw}
    if method == "mi+ft":
        for k in ("coef_rank", "lr_base"):
            settings.pop(k, None)
    cfg = config_for(method, **settings)
    return api.compress(model, ToyTokenizer(), cfg, state_dir=state_dir, resume=resume)


@pytest.mark.parametrize("fam", FAMILIES)
def test_fusegpt_end_to_end(fam, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusegpt.checkpoint import save_pruned

    model = tiny_model(fam)
    model, report = _run(model, text_file)
    assert model.config.num_hidden_layers == 4 and len(report.removed) == 2
    assert not any(isinstance(m, FusedLinear) for m in model.modules())
    step = report.steps[0]
    assert len(step.iterations) == 2 and all(it["fused"] for it in step.iterations)
    assert all(len(g["loss_per_epoch"]) == 2 for g in step.details["groups"])
    assert all(p.requires_grad for p in model.parameters())
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    out = save_pruned(model, ToyTokenizer(), tmp_path / "out", report)
    saved = json.loads((out / "report.json").read_text())
    assert saved["removed"] == report.removed and saved["steps"][0]["iterations"][0]["loss_per_epoch"]
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert stock.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, logits, rtol=0, atol=0)


def test_mi_ft_end_to_end(text_file):
    model, report = _run(tiny_model("llama"), text_file, method="mi+ft", lr=1e-3)
    step = report.steps[0]
    assert model.config.num_hidden_layers == 4
    assert step.config["lr"] == 1e-3 and not any(it["fused"] for it in step.iterations)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_deterministic_and_resume_after_kill(text_file, tmp_path, monkeypatch):
    ref_model, ref = _run(tiny_model("llama"), text_file, sparsity=0.5, epochs=1)
    again, rep2 = _run(tiny_model("llama"), text_file, sparsity=0.5, epochs=1)
    assert rep2.removed == ref.removed and len(ref.removed) == 3
    w_ref = _weights(ref_model)
    for k, v in _weights(again).items():
        assert torch.equal(v, w_ref[k]), k

    state = tmp_path / "state"

    def kill(it):
        if it == 1:
            raise KeyboardInterrupt("killed after the 2nd block")

    monkeypatch.setattr(fusion, "_after_iteration", kill)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model("llama"), text_file, sparsity=0.5, epochs=1, state_dir=str(state))
    assert json.loads((state / "0-fusegpt" / "state.json").read_text())["done"] == 2
    monkeypatch.setattr(fusion, "_after_iteration", lambda it: None)
    with pytest.raises(ValueError, match="other settings"):
        _run(tiny_model("llama"), text_file, sparsity=0.5, epochs=2, state_dir=str(state), resume=True)
    resumed, rep3 = _run(tiny_model("llama"), text_file, sparsity=0.5, epochs=1, state_dir=str(state), resume=True)
    assert rep3.removed == ref.removed and len(rep3.steps[0].iterations) == 3
    w = _weights(resumed)
    assert w.keys() == w_ref.keys()
    for k, v in w.items():
        assert torch.equal(v, w_ref[k]), k


def test_divergence_retry_then_fallback(text_file, monkeypatch):
    real = fusion_train.make_loss
    calls = {"n": 0}

    def flaky(name, adapter=None, sink_ratio=0.0):
        fn = real(name, adapter, sink_ratio)

        def loss(h, t):
            out = fn(h, t)
            if not torch.is_grad_enabled():
                return out
            calls["n"] += 1
            return out * float("nan") if calls["n"] <= 2 else out
        return loss

    monkeypatch.setattr(fusion_train, "make_loss", flaky)
    model, report = _run(tiny_model("llama"), text_file, max_retries=3)
    its = report.steps[0].iterations
    assert its[0]["retries"] >= 1 and its[0]["fused"] and math.isclose(its[0]["lr_scale"], 0.1 ** its[0]["retries"])

    def always_nan(name, adapter=None, sink_ratio=0.0):
        fn = real(name, adapter, sink_ratio)
        return lambda h, t: fn(h, t) * (float("nan") if torch.is_grad_enabled() else 1.0)

    monkeypatch.setattr(fusion_train, "make_loss", always_nan)
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    model, report = _run(model, text_file, max_retries=1)
    step = report.steps[0]
    assert step.details["fallbacks"] == report.removed and all(it["diverged"] for it in step.iterations)
    # a fallback is plain removal: same weights as the untouched blocks of a fresh model
    plain = tiny_model("llama")
    get_adapter(plain).keep_layers([i for i in range(6) if i not in report.removed])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits)


def test_revert_if_worse_keeps_plain_removal(text_file, monkeypatch):
    """A group whose loss did not fall is undone under revert_if_worse, and only then."""
    real = fusion.eval_loss
    calls = {"n": 0}

    def worse_after(*a, **kw):  # every second call (the one after training) reports a higher loss
        calls["n"] += 1
        return real(*a, **kw) + (1.0 if calls["n"] % 2 == 0 else 0.0)

    monkeypatch.setattr(fusion, "eval_loss", worse_after)
    _, kept = _run(tiny_model("llama"), text_file, training="paper")
    assert all(it["worse"] and it["fused"] and not it["reverted"] for it in kept.steps[0].iterations)
    calls["n"] = 0
    ids = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    model, report = _run(tiny_model("llama"), text_file, revert_if_worse=True, training="paper")
    step = report.steps[0]
    assert step.details["fallbacks"] == report.removed
    assert all(it["reverted"] and not it["fused"] for it in step.iterations)
    assert all(g["loss_end"] is not None for g in step.details["groups"])
    plain = tiny_model("llama")
    get_adapter(plain).keep_layers([i for i in range(6) if i not in report.removed])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits)


def test_cli_prune_fusegpt_and_resume(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from fusegpt.cli import main

    from .conftest import load_stock

    path, text = tiny_checkpoint
    out = tmp_path / "out"
    argv = ["prune", "--model", str(path), "--method", "fusegpt", "--sparsity", "0.3", "--calib", str(text),
            "--nsamples", "2", "--seqlen", "16", "--no-eval", "--output", str(out), "--preset", "cpu",
            "--set", "epochs=1", "--set", "ft_nsamples=4", "--set", "ft_seqlen=16", "--set", "group_size=3",
            "--set", "lora_rank=2", "--set", "coef_rank=2"]

    def kill(it):
        raise KeyboardInterrupt

    monkeypatch.setattr(fusion, "_after_iteration", kill)
    assert main(argv) == 130 and not out.exists()
    err = capsys.readouterr().err
    assert (tmp_path / "out.state" / "0-fusegpt" / "state.json").is_file()
    # the message names where the state is, its size, and the exact command that resumes
    assert f"Run state kept in {tmp_path / 'out.state'}" in err and (" kB)" in err or " MB)" in err)
    assert "resume with:\n  fusegpt prune --model" in err and err.rstrip().endswith("--resume")
    monkeypatch.setattr(fusion, "_after_iteration", lambda it: None)
    assert main([*argv, "--resume"]) == 0
    assert not (tmp_path / "out.state").exists()
    report = json.loads((out / "report.json").read_text())
    assert len(report["removed"]) == 2 and report["steps"][0]["config"]["preset"] == "cpu"
    assert load_stock(out, "llama").config.num_hidden_layers == 4


def test_restart_lora_keeps_the_function():
    torch.manual_seed(0)
    fl = FusedLinear(torch.randn(6, 5), torch.randn(6), lora_rank=2)
    with torch.no_grad():
        fl.lora_B.normal_()
    x = torch.randn(3, 5)
    with torch.no_grad():
        before = fl(x)
        fl.restart_lora()
        after = fl(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(fl.lora_B) == 0 and fl.lora_A.abs().sum() > 0


def test_lora_restart_runs_end_to_end(text_file):
    model, report = _run(tiny_model("llama"), text_file, lora_restart=True)
    assert len(report.removed) == 2 and report.steps[0].config["lora_restart"] is True
