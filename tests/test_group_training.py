"""Stable group training (warm-up, clipping, held-in validation, best epoch) and fuse-trial selection."""

from __future__ import annotations

import pytest
import torch

from fusegpt import api, config_for
from fusegpt.data import calibration_windows, heldout_windows
from fusegpt.fusion import TrainSettings, eval_loss, train_group
from fusegpt.fusion.group_training import lr_factor
from fusegpt.methods.fusegpt import loop
from fusegpt.models import get_adapter

from .conftest import ToyTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

RUN = dict(sparsity=0.3, epochs=3, batch_size=2, ft_nsamples=4, ft_seqlen=16, group_size=4, lora_rank=4,
           coef_rank=4, nsamples=2, seqlen=16, loss="mse", lr_base=1e-3, val_nsamples=4)


def test_warmup_then_cosine():
    assert [lr_factor(s, 10, 0) for s in (0, 5)] == [1.0, pytest.approx(0.5)]  # the reference's cosine
    f = [lr_factor(s, 10, 4) for s in range(10)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False)) and f[-1] > 0


def test_heldout_windows_do_not_overlap_training(text_file):
    tok = ToyTokenizer()
    train = calibration_windows(tok, text_file, 6, 32, seed=3)
    val = heldout_windows(tok, text_file, 5, 32, seed=3, train_nsamples=6)
    assert val.shape == (5, 32)
    stream = torch.tensor(tok.encode(open(text_file).read()))

    def start(w):
        return next(i for i in range(stream.numel() - 31) if torch.equal(stream[i:i + 32], w))

    starts_t = [start(w) for w in train]
    starts_v = [start(w) for w in val]
    assert all(abs(a - b) >= 32 for a in starts_v for b in (*starts_t, *[x for x in starts_v if x != a]))
    assert torch.equal(val, heldout_windows(tok, text_file, 5, 32, seed=3, train_nsamples=6))


def _student_setup():
    model = tiny_model("llama")
    a = get_adapter(model)
    for q in model.parameters():
        q.requires_grad_(False)
    norms = [q for m in a.norm_modules(a.layers[1]) for q in m.parameters()]
    for q in norms:
        q.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, a.config.hidden_size, generator=g)
    with torch.no_grad():
        start_out = loop.run_group(a, [1], x, a.context(x))
    return a, norms, x, start_out


@pytest.mark.parametrize("keep_best", [True, False])
def test_best_epoch_restores_the_untrained_start(keep_best):
    """Validation targets = the untrained output, so epoch 0 is best: keep_best must restore it exactly."""
    a, norms, x, start_out = _student_setup()
    before = [q.detach().clone() for q in norms]
    targets = start_out + 0.5 * torch.randn_like(start_out)  # training moves the norms away from the start
    s = TrainSettings(epochs=3, batch_size=2, lr_coef=0.0, lr_base=1e-2, loss="mse", seed=0, warmup=0.2,
                      clip_grad=1.0, keep_best=keep_best)
    res = train_group(a, [1], x, targets, [], norms, s, val=(x, start_out))
    assert len(res.val_loss_per_epoch) == 4 and res.val_loss_per_epoch[0] == pytest.approx(0.0, abs=1e-12)
    assert min(res.val_loss_per_epoch[1:]) > 0
    same = all(torch.equal(q, b) for q, b in zip(norms, before, strict=True))
    if keep_best:
        assert res.best_epoch == 0 and same
        assert eval_loss(a, [1], x, start_out, "mse", 2) == pytest.approx(0.0, abs=1e-12)
    else:
        assert res.best_epoch is None and not same


def test_best_epoch_keeps_an_improving_epoch():
    a, norms, x, start_out = _student_setup()
    targets = start_out * 1.3  # learnable through the norm weights
    s = TrainSettings(epochs=4, batch_size=2, lr_coef=0.0, lr_base=2e-2, loss="mse", seed=0, keep_best=True)
    res = train_group(a, [1], x, targets, [], norms, s, val=(x, targets))
    assert res.best_epoch == 1 + min(range(4), key=lambda e: res.val_loss_per_epoch[1 + e])
    assert eval_loss(a, [1], x, targets, "mse", 2) == pytest.approx(min(res.val_loss_per_epoch), rel=1e-5)
    assert min(res.val_loss_per_epoch) < res.val_loss_per_epoch[0]


def test_clipping_bounds_the_step(monkeypatch):
    """With clip_grad the gradient norm reaching Adam is at most the bound."""
    a, norms, x, start_out = _student_setup()
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kw):
        out = real(params, max_norm, *args, **kw)
        seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    s = TrainSettings(epochs=1, batch_size=2, lr_coef=0.0, lr_base=1e-3, loss="mse", seed=0, clip_grad=1e-3)
    train_group(a, [1], x, start_out * 5, [], norms, s)
    assert seen and max(seen) <= 1e-3 * (1 + 1e-4)


def test_stable_defaults_no_group_ends_worse_than_it_started(text_file):
    cfg = config_for("fusegpt", calib_source=text_file, **RUN)
    model, report = api.compress(tiny_model("llama"), ToyTokenizer(), cfg)
    step = report.steps[0]
    assert step.config["training"] == "stable" and step.config["keep_best"] and step.config["warmup"] > 0
    for g in step.details["groups"]:
        assert len(g["val_loss_per_epoch"]) == RUN["epochs"] + 1
        assert g["val_end"] <= g["val_start"] * (1 + 1e-6)
        assert g["val_end"] == pytest.approx(min(g["val_loss_per_epoch"]), rel=1e-4)


def test_training_paper_is_the_reference_procedure(text_file, monkeypatch):
    r = config_for("fusegpt", training="paper").resolve()
    assert (r.warmup, r.clip_grad, r.val_nsamples, r.keep_best, r.sink_ratio) == (0.0, 0.0, 0, False, 0.0)
    assert r.origins["warmup"] == "training paper"
    assert config_for("fusegpt").resolve().sink_ratio == 10.0  # the stable default
    r = config_for("fusegpt", training="paper", clip_grad=0.5).resolve()
    assert r.clip_grad == 0.5 and r.origins["clip_grad"] == "explicit"
    seen = []
    real = loop.train_group

    def spy(*a, **kw):
        seen.append((a[6], kw.get("val")))
        return real(*a, **kw)

    monkeypatch.setattr(loop, "train_group", spy)
    api.compress(tiny_model("llama"), ToyTokenizer(),
                 config_for("fusegpt", calib_source=text_file, training="paper", **{**RUN, "val_nsamples": None}))
    assert seen and all(s.warmup == 0 and s.clip_grad == 0 and not s.keep_best and v is None for s, v in seen)


def test_fuse_trial_picks_the_best_trial_score(text_file):
    cfg = config_for("fusegpt", calib_source=text_file, selection="fuse-trial", trial_candidates=3, **RUN)
    model, report = api.compress(tiny_model("llama"), ToyTokenizer(), cfg)
    for it in report.steps[0].iterations:
        trial = it["trial_scores"]
        assert len(trial) == 3
        assert set(trial) <= {k for k, _ in sorted(it["scores"].items(), key=lambda kv: kv[1])[:3]}
        assert it["removed"] == [int(min(trial, key=trial.get))]
    # a trial leaves the model as it was: the same run without the trial's choice differing is deterministic
    again, rep2 = api.compress(tiny_model("llama"), ToyTokenizer(), cfg)
    assert rep2.removed == report.removed


def test_fuse_trial_scores_reflect_the_trial(text_file, monkeypatch):
    """The candidate whose trial leaves the last hidden state closest to the model's is removed, even
    when MI ranks it last of the candidates."""
    model = tiny_model("llama")
    a = get_adapter(model)
    cfg = config_for("fusegpt", calib_source=text_file, trial_candidates=3, **RUN).resolve()
    calib = calibration_windows(ToyTokenizer(), text_file, 2, 16, 0)
    ft = calibration_windows(ToyTokenizer(), text_file, 4, 16, 0)
    scores = torch.tensor([float("nan"), 0.1, 0.2, 0.3, 0.4, float("nan")], dtype=torch.float64)
    fake = iter([0.9, 0.5, 0.1])  # trial scores of blocks 1, 2, 3 in MI order
    monkeypatch.setattr(loop, "_final_distance", lambda *args, **kw: next(fake))
    for q in model.parameters():
        q.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p, trial = loop.fuse_trial(a, scores, calib, ft, True, 0, 0, cfg)
    assert p == 3 and trial == {"1": 0.9, "2": 0.5, "3": 0.1}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_damp_sinks_scales_only_the_sink_token():
    from fusegpt.fusion.group_training import damp_sinks

    t = torch.ones(2, 6, 4)
    t[:, 0] *= 1000.0  # the sink: norm 2000 against a median of 2
    h = t + 0.1
    dh, dt = damp_sinks(h, t, 10.0)
    assert torch.equal(dh[:, 1:], h[:, 1:]) and torch.equal(dt[:, 1:], t[:, 1:])
    assert dt[:, 0].norm(dim=-1) == pytest.approx(torch.full((2,), 20.0), rel=1e-5)  # 10 × the median
    assert torch.allclose(dh[:, 0] / h[:, 0], dt[:, 0] / t[:, 0])  # the same factor for student and teacher
    same = damp_sinks(h, t, 0.0)
    assert same[0] is h and same[1] is t


def test_sink_ratio_reaches_the_group_loss():
    """A target that differs from the student only on a huge first token: the damped loss is far smaller."""
    a, norms, x, start_out = _student_setup()
    t = start_out.clone()
    t[:, 0] = t[:, 0] * 1000.0
    plain = eval_loss(a, [1], x, t, "mse", 2)
    damped = eval_loss(a, [1], x, t, "mse", 2, sink_ratio=5.0)
    assert damped < plain / 100
    s = TrainSettings(epochs=1, batch_size=2, lr_coef=0.0, lr_base=1e-2, loss="mse", seed=0, sink_ratio=5.0)
    assert train_group(a, [1], x, t, [], norms, s).loss_per_epoch[0] < plain / 100
    with pytest.raises(ValueError, match="sink_ratio"):
        config_for("fusegpt", preset="cpu", sink_ratio=-1.0)
