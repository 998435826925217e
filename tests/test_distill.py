"""Recovery by distillation: KD losses and teacher signals, what trains, fidelity to the teacher, LinearPatch."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fusegpt import HealConfig, heal
from fusegpt.cli import main
from fusegpt.distill import OnlineTeacher, TeacherBatch, kd_loss, precompute_topk
from fusegpt.models import get_adapter

from .conftest import ToyTokenizer, load_stock, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _ids(n=2, t=24, seed=0):
    return torch.randint(1, 128, (n, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- losses and teacher signals
def test_kd_of_a_student_equal_to_its_teacher_is_zero_with_zero_gradient():
    model = tiny_model("llama")
    ids = _ids()
    t = OnlineTeacher(copy.deepcopy(model)).batch(torch.arange(2), ids)
    for p in model.parameters():
        p.requires_grad_(True)
    loss = kd_loss(model(ids).logits, t, temperature=1.0)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None) < 1e-6


def test_top_k_over_the_whole_vocabulary_is_the_full_kl(tmp_path):
    teacher, student = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    ids = _ids(4)
    full = OnlineTeacher(teacher).batch(torch.arange(4), ids)
    topk = precompute_topk(teacher, ids, k=teacher.config.vocab_size, batch_size=2, folder=tmp_path / "tk")
    assert topk.disk_bytes > 0 and topk.k == 128
    with torch.no_grad():
        s_logits = student(ids).logits
    for T in (1.0, 2.0):
        a = kd_loss(s_logits, full, T)
        tk = precompute_topk(teacher, ids, k=128, batch_size=2, folder=tmp_path / f"t{T}", temperature=T)
        for tail in ("bucket", "renormalise"):
            b = kd_loss(s_logits, tk.batch(torch.arange(4), ids), T, tail)
            torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4)  # fp16 values on disk
    small = precompute_topk(teacher, ids, k=8, batch_size=2, folder=tmp_path / "k8").batch(torch.arange(4), ids)
    assert small.topk_values.shape == (4, 24, 8) and float(kd_loss(s_logits, small)) > 0
    # the bucketed top-k KL is a lower bound of the full KL (the log-sum inequality on the tail)
    assert float(kd_loss(s_logits, small, tail="bucket")) <= float(kd_loss(s_logits, full)) + 1e-5
    # renormalised over the teacher's k tokens: a student that agrees on them has zero loss
    t = TeacherBatch(topk_values=torch.tensor([[[2.0, 1.0]]]), topk_indices=torch.tensor([[[3, 5]]]))
    s = torch.full((1, 1, 8), -5.0)
    s[0, 0, 3], s[0, 0, 5] = 7.0, 6.0
    assert abs(float(kd_loss(s, t))) < 1e-6


# ---------------------------------------------------------------- healing
@pytest.mark.parametrize("signal", ["online", "topk"])
def test_kd_heal_lowers_the_distillation_loss_and_merges(signal, text_file, tmp_path):
    pytest.importorskip("peft")
    teacher = tiny_model("llama", seed=0)
    student = copy.deepcopy(teacher)
    get_adapter(student).keep_layers([0, 1, 3, 5])  # a depth-pruned student of the same model
    cfg = HealConfig(source=text_file, nsamples=8, seqlen=32, epochs=3, lr=5e-3, batch_size=4, loss="kd",
                     teacher_signal=signal)
    healed, rec = heal(student, ToyTokenizer(), cfg, teacher_model=teacher, teacher_name="dense")
    assert rec.loss == "kd" and rec.teacher_signal == signal and rec.teacher == "dense"
    assert rec.kd_after < rec.kd_before and rec.trained == "lora"
    assert not any("lora" in n for n, _ in healed.named_modules())
    ids = _ids()
    with torch.no_grad():
        ref = healed(ids).logits
    from fusegpt.checkpoint import save_pruned

    save_pruned(healed, None, tmp_path / "h")
    with torch.no_grad():
        torch.testing.assert_close(load_stock(tmp_path / "h", "llama")(ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("trainable, touched", [("full", {"lm_head", "layers.3"}), ("norms", {"norm"})])
def test_what_trains(trainable, touched, text_file):
    teacher = tiny_model("llama", seed=0)
    student = copy.deepcopy(teacher)
    get_adapter(student).keep_layers([0, 1, 2, 5])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = HealConfig(source=text_file, nsamples=4, seqlen=32, epochs=2, lr=1e-3, batch_size=2, loss="kd+lm",
                     trainable=trainable, full_blocks=1)
    healed, rec = heal(student, ToyTokenizer(), cfg, teacher_model=teacher)
    changed = {n for n, p in healed.named_parameters() if not torch.equal(p, before[n])}
    assert changed and rec.trainable_params > 0
    assert all(any(t in n for t in touched) for n in changed), changed
    if trainable == "full":  # the last kept block is index 3 now; earlier blocks stay as they were
        assert not any(n.startswith("model.layers.0.") for n in changed)


def test_heal_refuses_a_distillation_without_a_teacher(text_file):
    from fusegpt import ConfigError

    with pytest.raises(ConfigError, match="--teacher"):
        heal(tiny_model("llama"), ToyTokenizer(), HealConfig(source=text_file, nsamples=2, seqlen=16, loss="kd"))
    with pytest.raises(ConfigError, match="teacher_signal=online"):
        HealConfig(hidden_weight=1.0, teacher_signal="topk")


def test_hidden_state_term_trains(text_file):
    teacher = tiny_model("llama", seed=0)
    student = copy.deepcopy(teacher)
    get_adapter(student).keep_layers([0, 2, 3, 5])
    cfg = HealConfig(source=text_file, nsamples=4, seqlen=32, epochs=2, lr=1e-3, batch_size=2, loss="kd",
                     hidden_weight=1.0, trainable="full", full_blocks=3)
    _, rec = heal(student, ToyTokenizer(), cfg, teacher_model=teacher)
    assert rec.teacher_signal == "online" and rec.loss_per_epoch[-1] < rec.loss_per_epoch[0] * 1.5


# ---------------------------------------------------------------- fidelity
def test_fidelity_of_a_model_to_itself_and_to_a_pruned_copy():
    from fusegpt.eval.fidelity import fidelity

    model = tiny_model("llama")
    toks = torch.randint(1, 128, (600,), generator=torch.Generator().manual_seed(0))
    same = fidelity(model, model, toks, 64, prompts=3, prompt_len=8, gen_len=6)
    assert same["kl"] < 1e-6 and same["top1"] == 1.0 and same["gen_match_mean"] == 6 and same["tokens"] == 9 * 64
    pruned = copy.deepcopy(model)
    get_adapter(pruned).keep_layers([0, 5])
    other = fidelity(pruned, model, toks, 64, prompts=3, prompt_len=8, gen_len=6)
    assert other["kl"] > 1e-3 and other["top1"] < 1.0 and other["gen_match_mean"] <= 6


# ---------------------------------------------------------------- LinearPatch
@pytest.mark.parametrize("n", [1, 2, 12, 20, 36, 64, 72, 576, 640, 896])
def test_hadamard_matrices_are_orthogonal(n):
    from fusegpt.linear_patch import hadamard

    H = hadamard(n)
    assert H is not None
    torch.testing.assert_close(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(H.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


def test_the_rotation_alone_leaves_a_dense_model_unchanged():
    from fusegpt.linear_patch import rotation
    from fusegpt.patching import attach_patch

    model = tiny_model("llama")
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    R, kind = rotation(64)
    assert kind == "hadamard"
    a = get_adapter(model)
    attach_patch(a.layers[3], (R @ torch.eye(64, dtype=torch.float64) @ R.T).float())  # d = 1: H·Hᵀ
    attach_patch(a.final_norm, (R @ R.T).float())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_linear_patch_on_a_depth_method_reloads_and_is_refused_by_stock_tools(text_file, tmp_path, bpe_tokenizer):
    from transformers import AutoModelForCausalLM

    from fusegpt import api, config_for, load_pruned
    from fusegpt.checkpoint import save_pruned
    from fusegpt.checkpoint.gguf import ExportError, export_gguf

    cfg = config_for("sleb", sparsity=0.34, calib_source=text_file, nsamples=2, seqlen=16, linear_patch=True,
                     patch_nsamples=4, patch_seqlen=32)
    model, report = api.compress(tiny_model("llama"), ToyTokenizer(), cfg)
    recs = report.steps[0].details["linear_patch"]
    assert recs and sum(len(r["span"]) for r in recs) == len(report.removed) == 3
    assert all(r["rotation"] == "hadamard" and r["scale_min"] > 0 for r in recs)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    out = save_pruned(model, None, tmp_path / "p", report)
    saved = json.loads((out / "config.json").read_text())
    assert "fusegpt_patches" in saved
    back, _ = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, rtol=0, atol=0)
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(ExportError, match="LinearPatch"):
        export_gguf(model, bpe_tokenizer, tmp_path / "p.gguf")


def test_linear_patch_then_kd_trains_only_the_patches(text_file):
    from fusegpt import api, config_for
    from fusegpt.patching import patches_of

    dense = tiny_model("llama")
    cfg = config_for("shortgpt", sparsity=0.34, calib_source=text_file, nsamples=2, seqlen=16, linear_patch=True,
                     patch_nsamples=4, patch_seqlen=32)
    model, _ = api.compress(copy.deepcopy(dense), ToyTokenizer(), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    healed, rec = heal(model, ToyTokenizer(), HealConfig(source=text_file, nsamples=4, seqlen=32, epochs=2, lr=1e-3,
                                                          batch_size=2, loss="kd", trainable="patches"),
                       teacher_model=dense)
    changed = {n for n, p in healed.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("fusegpt_patch" in n for n in changed)
    assert rec.trainable_params == 64 * 64 * len(patches_of(get_adapter(healed)))


# ---------------------------------------------------------------- through the CLI
def test_cli_prune_heal_kd_with_fidelity_then_heal_and_eval_with_a_teacher(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("peft")
    path, text = tiny_checkpoint
    common = ["--calib", str(text), "--nsamples", "2", "--seqlen", "32", "--eval-data", str(text), "--eval-seqlen", "32",
              "--max-tokens", "256"]
    heal_set = ["--heal-set", f"source={text}", "--heal-set", "nsamples=4", "--heal-set", "seqlen=32",
                "--heal-set", "loss=kd"]
    out = tmp_path / "mi"
    assert main(["prune", "--model", str(path), "--method", "mi", "--sparsity", "0.3", *common, "--output", str(out),
                 "--heal", *heal_set, "--fidelity", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "teacher top-64 logits computed once" in plan
    assert main(["-q", "prune", "--model", str(path), "--method", "mi", "--sparsity", "0.3", *common, "--output",
                 str(out), "--heal", *heal_set, "--fidelity"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["heal"]["loss"] == "kd" and rep["heal"]["teacher_signal"] == "topk"
    f = rep["fidelity"]["after"][str(text)]
    assert 0 < f["top1"] <= 1 and f["kl"] > 0 and "healed" in rep["fidelity"]
    assert "KL to teacher" in capsys.readouterr().out

    healed = tmp_path / "healed"
    assert main(["-q", "heal", "--model", str(out), "--output", str(healed), "--set", f"source={text}",
                 "--set", "nsamples=4", "--set", "seqlen=32", "--set", "loss=kd+lm", "--set", "teacher_signal=online",
                 "--no-eval"]) == 0  # the teacher is the source model named in out/report.json
    rep = json.loads((healed / "report.json").read_text())
    assert rep["heal"]["loss"] == "kd+lm" and rep["heal"]["teacher"] == str(path)
    capsys.readouterr()
    assert main(["eval", "--model", str(healed), "--data", str(text), "--seqlen", "32", "--max-tokens", "256",
                 "--teacher", str(path), "--prompts", "2", "--gen-len", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["fidelity"][str(text)]["gen_prompts"] == 2 and res["fidelity"]["teacher"] == str(path)
    assert main(["-q", "heal", "--model", str(path), "--output", str(tmp_path / "x"), "--set", "loss=kd",
                 "--no-eval"]) == 2  # the dense folder names no source to distil from
    assert "--teacher" in capsys.readouterr().err
