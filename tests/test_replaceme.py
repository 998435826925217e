"""ReplaceMe and ``linear_fold``: span choice, the least-squares map, the fold, stock checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusegpt import compress, config_for
from fusegpt.linear_map import (
    LinearMapError,
    contiguous_runs,
    fit_spans,
    fold_into_predecessor,
    span_distances,
)
from fusegpt.methods import ReplaceMeConfig
from fusegpt.methods.replaceme import choose_spans, span_lengths
from fusegpt.models import get_adapter
from fusegpt.settings import ConfigError
from fusegpt.utils import count_params

from .conftest import ToyTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _calib(n: int = 4, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 120, (n, t), generator=torch.Generator().manual_seed(seed))


class LinearBlock(nn.Module):
    """A toy decoder block whose output is a fixed linear function of its input."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, hidden_states, **_):
        return hidden_states @ self.a


def _split_subspaces_model():
    """Tiny LLaMA where block 0's input and attention live in dims 32..63 (Y) and its MLP writes only
    dims 0..31 (M), and block 1 is linear: out = x·diag(A₁, I). Then L = Y + M·A₁ exactly."""
    model = tiny_model("llama", num_hidden_layers=4)
    a = get_adapter(model)
    with torch.no_grad():
        a.embed_tokens.weight[:, :32] = 0
        roles = a.linear_roles(a.layers[0])
        roles["o_proj"].weight[:32] = 0
        roles["down_proj"].weight[32:] = 0
    a1 = torch.randn(32, 32, generator=torch.Generator().manual_seed(3)) / 32 ** 0.5
    full = torch.eye(64)
    full[:32, :32] = a1
    a.layers[1] = LinearBlock(full)
    return model, a1


def test_least_squares_map_is_exact_when_the_span_is_linear():
    model, a1 = _split_subspaces_model()
    a = get_adapter(model)
    ids = _calib()
    with torch.no_grad():
        want = model(ids).logits
    [fit] = fit_spans(a, ids, [(1, 2)], ridge=1e-9)
    assert fit.residual < 1e-5 < 0.1 < fit.residual_identity
    torch.testing.assert_close(fit.transform[:32, :32].float(), a1, atol=1e-4, rtol=1e-4)
    params = count_params(model)
    fold_into_predecessor(a, 0, fit.transform)
    assert count_params(model) == params  # the fold adds nothing
    a.keep_layers([0, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_span_distances_and_choice():
    model = tiny_model("llama", num_hidden_layers=6)
    a = get_adapter(model)
    d = span_distances(a, _calib(), [1, 2])
    assert d[1].shape == (6,) and d[2].shape == (5,)
    assert ((d[1] >= 0) & (d[1] <= 1)).all()
    last = span_distances(a, _calib(), [2], last_token=True)[2]
    assert not torch.allclose(last, d[2])
    fake = {2: torch.tensor([0.0, 0.1, 0.5, 0.05, 0.9]), 1: torch.tensor([0.0, 0.3, 0.2, 0.9, 0.1, 0.4])}
    # block 0 is never a span start; spans never overlap
    assert choose_spans(fake, [2, 1], 1, 6) == [(2, 3), (3, 5)]
    assert span_lengths(8, 3) == [3, 3, 2]
    assert contiguous_runs([2, 3, 4, 7]) == [(2, 5), (7, 8)]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("solver,spans", [("ls", 1), ("ls", 2), ("cosine", 1)])
def test_replaceme_runs_and_reloads_stock(tmp_path, text_file, family, solver, spans):
    from transformers import AutoModelForCausalLM

    from fusegpt.checkpoint import save_pruned

    model = tiny_model(family, num_hidden_layers=8)
    params = count_params(model)
    block_params = sum(p.numel() for p in get_adapter(model).layers[0].parameters())
    cfg = ReplaceMeConfig(sparsity=0.25, calib_source=text_file, nsamples=4, seqlen=32, solver=solver, spans=spans)
    model, rep = compress(model, ToyTokenizer(), cfg)
    step = rep.steps[0]
    assert len(step.removed) == 2 and 0 not in step.removed
    assert model.config.num_hidden_layers == 6 and count_params(model) == params - 2 * block_params
    info = step.details["spans"]
    assert sum(len(s["blocks"]) for s in info) == 2 and all(s["into"] == s["blocks"][0] - 1 for s in info)
    if solver == "ls":
        assert all(s["residual"] < s["residual_without_map"] for s in info)
    else:
        assert all(s["cosine_loss"]["after"] < s["cosine_loss"]["before"] for s in info)
    out = save_pruned(model, None, tmp_path / "ck", rep)
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _calib(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_replaceme_is_deterministic(text_file):
    outs = []
    for _ in range(2):
        model, rep = compress(tiny_model("llama", num_hidden_layers=8), ToyTokenizer(),
                              ReplaceMeConfig(sparsity=0.25, calib_source=text_file, nsamples=4, seqlen=32))
        outs.append((rep.steps[0].removed, [p.detach().clone() for p in model.parameters()]))
    assert outs[0][0] == outs[1][0]
    assert all(torch.equal(x, y) for x, y in zip(outs[0][1], outs[1][1], strict=True))


@pytest.mark.parametrize("method", ["shortgpt", "sleb", "mi", "mi+ft", "fusegpt"])
def test_linear_fold_for_every_depth_method(text_file, method):
    """Same removals as without the fold on the first step, the predecessor's down projection
    changed, nothing else, and the fit recorded."""
    extra = {"epochs": 1, "ft_nsamples": 4, "ft_seqlen": 32, "val_nsamples": 2} if method in ("mi+ft", "fusegpt") else {}
    base = dict(sparsity=0.125, calib_source=text_file, nsamples=4, seqlen=32, preset="cpu", fold_nsamples=4,
                fold_seqlen=32, **extra)
    plain, rep0 = compress(tiny_model("llama", num_hidden_layers=8), ToyTokenizer(), config_for(method, **base))
    folded, rep1 = compress(tiny_model("llama", num_hidden_layers=8), ToyTokenizer(),
                            config_for(method, linear_fold="ls", **base))
    assert rep1.steps[0].removed == rep0.steps[0].removed
    [fold] = rep1.steps[0].iterations[0]["linear_fold"]
    assert fold["folded"] and fold["blocks"] == rep0.steps[0].removed
    assert fold["residual"] < fold["residual_without_map"]
    assert count_params(folded) == count_params(plain)
    if method in ("shortgpt", "sleb", "mi"):  # no training: only the predecessor's down projection differs
        changed = [n for (n, p), (_, q) in zip(plain.named_parameters(), folded.named_parameters(), strict=True)
                   if not torch.equal(p, q)]
        into = rep0.steps[0].removed[0] - 1
        assert changed == [f"model.layers.{into}.mlp.down_proj.weight"]


def test_refusals(text_file):
    with pytest.raises(ConfigError, match="linear_fold"):
        ReplaceMeConfig(linear_fold="ls")
    with pytest.raises(ConfigError, match="spans"):
        compress(tiny_model("llama", num_hidden_layers=8), ToyTokenizer(),
                 ReplaceMeConfig(sparsity=0.125, spans=3, calib_source=text_file, nsamples=2, seqlen=16))
    with pytest.raises(ConfigError, match="solver"):
        ReplaceMeConfig(solver="adam")
    gemma2 = tiny_model("gemma2")  # a norm after the FFN: the map cannot be folded
    with pytest.raises(LinearMapError, match="norm after the FFN"):
        fit_spans(get_adapter(gemma2), _calib(2, 16), [(1, 2)])
    with pytest.raises(ConfigError, match="norm after the FFN"):  # and the plan knows it from the family
        compress(gemma2, ToyTokenizer(), ReplaceMeConfig(sparsity=0.2, calib_source=text_file, nsamples=8, seqlen=16))


def test_cli_replaceme_and_linear_fold(tiny_checkpoint, tmp_path, capsys):
    import json

    from fusegpt.cli import main

    path, text = tiny_checkpoint
    common = ["--model", str(path), "--sparsity", "0.34", "--calib", str(text), "--nsamples", "2", "--seqlen", "16",
              "--no-eval"]
    enough = ["--model", str(path), "--sparsity", "0.34", "--calib", str(text), "--nsamples", "8", "--seqlen", "16",
              "--no-eval"]  # a 64 × 64 least-squares map needs at least 64 tokens
    assert main(["prune", "--method", "replaceme", "--set", "spans=2", "--output", str(tmp_path / "rm"), *enough]) == 0
    rep = json.loads((tmp_path / "rm" / "report.json").read_text())
    assert len(rep["steps"][0]["details"]["spans"]) in (1, 2) and len(rep["steps"][0]["removed"]) == 3
    assert main(["prune", "--method", "sleb", "--set", "linear_fold=ls", "--output", str(tmp_path / "sl"), *common]) == 0
    rep = json.loads((tmp_path / "sl" / "report.json").read_text())
    assert all(it["linear_fold"] for it in rep["steps"][0]["iterations"])
    assert main(["prune", "--method", "replaceme", "--set", "solver=adam", "--output", str(tmp_path / "x"),
                 *common]) == 2
    assert "solver" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.real
def test_replaceme_on_the_embedded_model():
    """The map is worth having on real text: removing ReplaceMe's span with the map beats removing it without
    (measured: 34.31 without, 30.12 with at 64 × 256 news tokens; with only 8 × 128 the 576 × 576 map overfits
    and is worse, 46.99)."""
    from fusegpt import EvalConfig, evaluate, load_model

    evalc = EvalConfig(data=("wiki",), seqlen=256, max_tokens=2048)
    model, tok = load_model()
    model, rep = compress(model, tok, ReplaceMeConfig(sparsity=0.1, calib_source="news", preset="cpu"))
    [span] = rep.steps[0].details["spans"]
    assert len(span["blocks"]) == 3 and span["residual"] < span["residual_without_map"]
    with_map = evaluate(model, tok, evalc)["wiki"]
    plain, _ = load_model()
    get_adapter(plain).keep_layers([i for i in range(30) if i not in span["blocks"]])
    without = evaluate(plain, tok, evalc)["wiki"]
    assert with_map < without, (with_map, without)


def test_linear_fold_leaves_the_group_teacher_alone(text_file, monkeypatch):
    """FuseGPT / MI+FT learn from the model *with* the removed block: the fold into its predecessor
    must come after the teacher outputs are taken (a fold first would corrupt the target)."""
    from fusegpt.methods.fusegpt import loop

    seen = []
    original = loop._group_outputs

    def record(*args, **kw):
        out = original(*args, **kw)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(loop, "_group_outputs", record)
    base = dict(sparsity=0.125, calib_source=text_file, nsamples=4, seqlen=32, preset="cpu", epochs=1, ft_nsamples=4,
                ft_seqlen=32, val_nsamples=2, fold_nsamples=4, fold_seqlen=32)
    _, plain = compress(tiny_model("llama", num_hidden_layers=8), ToyTokenizer(), config_for("mi+ft", **base))
    n = len(seen)
    _, folded = compress(tiny_model("llama", num_hidden_layers=8), ToyTokenizer(),
                         config_for("mi+ft", linear_fold="ls", **base))
    assert len(seen) == 2 * n and all(torch.equal(a, b) for a, b in zip(seen[:n], seen[n:], strict=True))
    start0, start1 = (r.steps[0].details["groups"][0]["loss_start"] for r in (plain, folded))
    assert start1 < start0  # the map lowers the student's starting loss against the same teacher
    assert folded.steps[0].iterations[0]["linear_fold"][0]["folded"]


def test_span_residuals_find_the_linear_span():
    """The residual table is the least-squares fit's own residual: ~0 for the linear span 1..1, and it
    equals what fit_spans reports for any span."""
    from fusegpt.linear_map import span_residuals

    model, _ = _split_subspaces_model()
    a = get_adapter(model)
    ids = _calib()
    r = span_residuals(a, ids, [1, 2], ridge=1e-9)
    assert r[1].shape == (4,) and r[2].shape == (3,) and r[1][0] == float("inf")
    assert float(r[1][1]) < 1e-4 < 0.05 < float(r[1][3]) and int(torch.argmin(r[1])) == 1
    assert float(r[1][2]) == float("inf")  # its predecessor (the linear toy block) has no down projection
    [fit] = fit_spans(a, ids, [(3, 4)], ridge=1e-9)
    assert abs(float(r[1][3]) - fit.residual) < 1e-6


def test_replaceme_span_choice_by_residual(text_file):
    model = tiny_model("llama")
    model, rep = compress(model, ToyTokenizer(), ReplaceMeConfig(sparsity=0.3, nsamples=4, seqlen=32,
                                                                  calib_source=text_file, span_choice="residual"))
    d = rep.steps[0].details
    assert d["span_choice"] == "residual" and len(rep.removed) == 2
    scores = rep.steps[0].iterations[0]["scores"]
    start = min(rep.removed)
    assert scores[str(start)] == min(scores.values())  # the chosen span has the lowest fit residual
