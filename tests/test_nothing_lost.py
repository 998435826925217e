"""Nothing lost, second pass: each defect of the second review, on tiny models, through the real CLI.

A command replaces only what it can prove it wrote (a marker with a run id and a manifest), never
writes over an input, never discards a run state without --resume / --restart, handles SIGTERM as
Ctrl-C, checks everything it can in the plan, and reports only its own errors as one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fusegpt.cli import main
from fusegpt.methods.fusegpt import loop as fusion

from .conftest import one_line_error as _one_line
from .conftest import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

FUSE = ["--method", "fusegpt", "--sparsity", "0.3", "--nsamples", "2", "--seqlen", "16", "--no-eval",
        "--preset", "cpu", "--set", "epochs=1", "--set", "ft_nsamples=4", "--set", "ft_seqlen=16",
        "--set", "group_size=3", "--set", "lora_rank=2", "--set", "coef_rank=2", "--set", "val_nsamples=1"]


def _mi(path, text, out, *extra):
    return ["-q", "prune", "--model", str(path), "--method", "mi", "--sparsity", "0.3", "--calib", str(text),
            "--nsamples", "2", "--seqlen", "16", "--no-eval", "--output", str(out), *extra]


def _no_load(monkeypatch):
    import fusegpt.api

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(fusegpt.api, "load_model", refuse)


# ---------------------------------------------------------------- GGUF conversion cache
def test_gguf_cache_follows_the_file_content_not_its_name(tmp_path, bpe_tokenizer, monkeypatch):
    """A re-export over model.gguf with the same size must not reuse the first file's converted weights."""
    from fusegpt.checkpoint.gguf import export_gguf
    from fusegpt.loading import load_model

    monkeypatch.setenv("FUSEGPT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    first = tiny_model("llama", seed=1, vocab_size=300)
    export_gguf(first, bpe_tokenizer, path)
    size = path.stat().st_size
    a, _ = load_model(str(path))
    second = tiny_model("llama", seed=2, vocab_size=300)
    export_gguf(second, bpe_tokenizer, path, overwrite=True)
    assert path.stat().st_size == size  # same name, same size: the old key would have matched
    b, _ = load_model(str(path))
    w = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(b.state_dict()[w], second.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], b.state_dict()[w])


# ---------------------------------------------------------------- full disk, failed saves
def test_too_little_free_space_is_refused_before_loading(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import shutil

    import fusegpt.checkpoint.atomic as atomic

    path, text = tiny_checkpoint
    _no_load(monkeypatch)
    real = shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    _one_line(main(_mi(path, text, tmp_path / "o")), capsys.readouterr().err, "MiB free")
    assert not (tmp_path / "o").exists()


def test_a_safetensors_error_during_the_save_keeps_the_model(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    import fusegpt.api as api

    path, text = tiny_checkpoint
    real = api.save_pruned
    calls = {"n": 0}

    def disk_full(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise SafetensorError("Error while serializing: IoError(No space left on device)")
        return real(*a, **k)

    monkeypatch.setattr(api, "save_pruned", disk_full)
    rc = main(_mi(path, text, tmp_path / "o"))
    err = capsys.readouterr().err
    _one_line(rc, err, "No space left on device", code=1)
    kept = Path(err.split("saved to ")[1].split(" instead")[0])
    assert (kept / "model.safetensors").is_file() and json.loads((kept / "report.json").read_text())["method"] == "mi"


# ---------------------------------------------------------------- --overwrite proves ownership
def test_overwrite_needs_a_manifest_not_a_file_name(tiny_checkpoint, tmp_path, capsys):
    path, text = tiny_checkpoint
    user = tmp_path / "mine"
    user.mkdir()
    (user / "report.json").write_text("{}\n")
    (user / "keep.txt").write_text("precious\n")
    _one_line(main(_mi(path, text, user, "--overwrite")), capsys.readouterr().err, "did not write")
    (user / "report.json").unlink()
    (user / "state.json").write_text("{}\n")
    _one_line(main(_mi(path, text, user, "--overwrite")), capsys.readouterr().err, "did not write")
    (user / ".fusegpt").write_text("written by fusegpt; fusegpt may replace this folder (--overwrite)\n")
    _one_line(main(_mi(path, text, user, "--overwrite")), capsys.readouterr().err, "marker")
    assert (user / "keep.txt").read_text() == "precious\n"

    out = tmp_path / "o"
    assert main(_mi(path, text, out)) == 0
    marker = json.loads((out / ".fusegpt").read_text())
    assert len(marker["run_id"]) == 32 and "model.safetensors" in marker["files"]
    assert main(_mi(path, text, out, "--overwrite")) == 0  # our own output, unchanged: may be replaced
    (out / "keep.txt").write_text("added by the user\n")
    _one_line(main(_mi(path, text, out, "--overwrite")), capsys.readouterr().err, "keep.txt")
    (out / "keep.txt").unlink()
    (out / "report.json").write_text((out / "report.json").read_text() + " ")  # edited by hand
    _one_line(main(_mi(path, text, out, "--overwrite")), capsys.readouterr().err, "changed since")


def test_every_file_gets_the_umask(tiny_checkpoint, tmp_path):
    path, text = tiny_checkpoint
    old = os.umask(0o022)
    try:
        assert main(_mi(path, text, tmp_path / "o")) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755  # the folder too
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


# ---------------------------------------------------------------- export never writes over an input
def test_export_refuses_its_input_and_files_it_did_not_write(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    path, _ = tiny_checkpoint
    monkeypatch.setattr("fusegpt.cli.prune.load_model", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("loaded before the output was checked")))
    weights = path / "model.safetensors"
    before = weights.read_bytes()
    _one_line(main(["export", "--model", str(path), "--gguf", str(weights), "--overwrite"]), capsys.readouterr().err,
              "input")
    _one_line(main(["export", "--model", str(path), "--gguf", str(path / "new.gguf")]), capsys.readouterr().err,
              "input")
    assert weights.read_bytes() == before and not (path / "new.gguf").exists()
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model\n")
    _one_line(main(["export", "--model", str(path), "--gguf", str(notes), "--overwrite"]), capsys.readouterr().err,
              "not a GGUF file fusegpt wrote")
    assert notes.read_text() == "not a model\n"


def test_export_overwrites_its_own_gguf_and_names_the_model_not_the_path(tmp_path, bpe_tokenizer):
    from gguf import GGUFReader

    from fusegpt.checkpoint import save_pruned
    from fusegpt.checkpoint.gguf import RUN_ID_KEY

    model = tiny_model("llama", vocab_size=300)
    save_pruned(model, bpe_tokenizer, tmp_path / "ckpt")
    out = tmp_path / "o.gguf"
    argv = ["export", "--model", str(tmp_path / "ckpt"), "--gguf", str(out)]
    assert main(argv) == 0 and main([*argv, "--overwrite"]) == 0
    fields = GGUFReader(str(out)).fields
    assert RUN_ID_KEY in fields
    name = fields["general.name"].contents()
    assert name == "ckpt" and str(tmp_path) not in name


# ---------------------------------------------------------------- bench, sweep, report outputs
def test_bench_output_is_checked_before_the_benchmark(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import fusegpt.eval.speed as speed

    path, _ = tiny_checkpoint
    keep = tmp_path / "keep.txt"
    keep.write_text("mine\n")
    monkeypatch.setattr(speed, "bench_models", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("benchmarked before the output was checked")))
    _one_line(main(["bench", "--model", str(path), "--output", str(keep)]), capsys.readouterr().err, "exists")
    _one_line(main(["bench", "--model", str(path), "--output", str(keep), "--overwrite"]), capsys.readouterr().err,
              "fusegpt did not write it")
    assert keep.read_text() == "mine\n"


def test_bench_prints_first_and_replaces_only_its_own_json(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(path), "--lengths", "8", "--batch-sizes", "1", "--decode-tokens", "2",
            "--repeats", "1", "--warmup", "0", "--output", str(out)]
    assert main(argv) == 0
    assert "prefill" in capsys.readouterr().out
    assert json.loads(out.read_text())["fusegpt"]["kind"] == "bench"
    assert main([*argv, "--overwrite"]) == 0


def test_sweep_and_report_never_write_over_a_users_file(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    path, text = tiny_checkpoint
    sweep = tmp_path / "s"
    sweep.mkdir()
    (sweep / "sweep.md").write_text("my notes\n")
    import fusegpt.sweep

    monkeypatch.setattr(fusegpt.sweep, "load_model", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("loaded before the sweep folder was checked")))
    argv = ["-q", "sweep", "--model", str(path), "--methods", "mi", "--sparsity", "0.2", "--calib", str(text),
            "--nsamples", "2", "--seqlen", "16", "--eval-data", str(text), "--eval-seqlen", "16", "--max-tokens", "64",
            "--no-plots", "--output", str(sweep)]
    _one_line(main(argv), capsys.readouterr().err, "sweep.md")
    assert (sweep / "sweep.md").read_text() == "my notes\n"

    run = tmp_path / "run"
    assert main(_mi(path, text, run)) == 0
    pytest.importorskip("matplotlib")
    assert main(["report", str(run)]) == 0 and main(["report", str(run)]) == 0  # its own report.md: replaced
    assert main(_mi(path, text, run, "--overwrite")) == 0  # the report's files are in the manifest
    (run / "report.md").write_text("my own page\n")
    _one_line(main(["report", str(run)]), capsys.readouterr().err, "report.md")
    assert (run / "report.md").read_text() == "my own page\n"


# ---------------------------------------------------------------- concurrent runs
def test_a_second_run_on_the_same_output_fails_at_once(tiny_checkpoint, tmp_path, capsys):
    path, text = tiny_checkpoint
    out = tmp_path / "o"
    live = tmp_path / ".o.tmp-live"  # the first run's save in progress
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"x" * 100)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from fusegpt.checkpoint.locking import output_lock
        with output_lock({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _one_line(main(_mi(path, text, out, "--overwrite")), capsys.readouterr().err, f"(pid {holder.pid})")
        assert live.is_dir() and (live / "model.safetensors").is_file()  # not taken for a stale temporary
    finally:
        holder.kill()
        holder.wait()
    assert main(_mi(path, text, out)) == 0  # the lock dies with its holder
    assert not live.exists() and not (tmp_path / ".o.lock").exists()


# ---------------------------------------------------------------- run state: never discarded silently
def _interrupted_fuse_run(path, text, out, monkeypatch, before_kill=None) -> list[str]:
    """Run the tiny FuseGPT command until its first block is done and its state saved, then Ctrl-C; returns
    the command (rc 130 checked) with the interruption undone for the next call."""
    argv = ["prune", "--model", str(path), "--calib", str(text), *FUSE, "--output", str(out)]

    def kill(it):
        if before_kill is not None:
            before_kill()
        raise KeyboardInterrupt

    monkeypatch.setattr(fusion, "_after_iteration", kill)
    assert main(argv) == 130
    monkeypatch.setattr(fusion, "_after_iteration", lambda it: None)
    return argv


def test_a_kept_run_state_needs_resume_or_restart(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    path, text = tiny_checkpoint
    out = tmp_path / "out"
    argv = _interrupted_fuse_run(path, text, out, monkeypatch)
    state = tmp_path / "out.state"
    saved = (state / "0-fusegpt" / "state.json").read_bytes()
    _no_load(monkeypatch)
    _one_line(main(argv), capsys.readouterr().err, "--resume")
    assert (state / "0-fusegpt" / "state.json").read_bytes() == saved  # untouched
    _one_line(main([*argv, "--resume", "--restart"]), capsys.readouterr().err, "exclude each other")
    monkeypatch.undo()
    monkeypatch.setattr(fusion, "_after_iteration", lambda it: None)
    assert main([*argv, "--restart"]) == 0
    assert not state.exists() and json.loads((out / "report.json").read_text())["resumed"] is False


def test_a_resumed_report_says_so_and_counts_the_earlier_time(tiny_checkpoint, tmp_path, monkeypatch):
    import time

    path, text = tiny_checkpoint
    out = tmp_path / "out"
    argv = _interrupted_fuse_run(path, text, out, monkeypatch, before_kill=lambda: time.sleep(1.5))
    assert main([*argv, "--resume"]) == 0
    rep = json.loads((out / "report.json").read_text())
    step = rep["steps"][0]
    assert rep["resumed"] is True and step["resumed"]["after_iterations"] == 1
    assert step["resumed"]["earlier_wall_time_s"] > 0 and step["wall_time_s"] >= step["resumed"]["earlier_wall_time_s"]


def test_a_corrupt_run_state_is_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    path, text = tiny_checkpoint
    out = tmp_path / "out"
    argv = _interrupted_fuse_run(path, text, out, monkeypatch)
    pt = tmp_path / "out.state" / "0-fusegpt" / "model.pt"
    pt.write_bytes(pt.read_bytes()[:200])
    rc = main([*argv, "--resume"])
    err = capsys.readouterr().err
    _one_line(rc, err, "--restart")
    assert "weights_only=False" not in err.replace("never loads such a file with weights_only=False", "")


# ---------------------------------------------------------------- SIGTERM and --max-memory keep the state
def test_sigterm_keeps_the_state_and_prints_the_resume_command(tiny_checkpoint, tmp_path):
    path, text = tiny_checkpoint
    out = tmp_path / "out"
    argv = ["prune", "--model", str(path), "--calib", str(text), *FUSE, "--output", str(out)]
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        torch.set_num_threads(1)
        from fusegpt.methods.fusegpt import loop
        loop._after_iteration = lambda it: os.kill(os.getpid(), signal.SIGTERM)
        from fusegpt.cli import main
        sys.exit(main({argv!r}))
        """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 143, res.stderr
    assert "terminated (SIGTERM)" in res.stderr and "Run state kept in" in res.stderr
    assert res.stderr.rstrip().endswith("--resume") and "Traceback" not in res.stderr
    assert (tmp_path / "out.state" / "0-fusegpt" / "state.json").is_file() and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put the handler back (in this process)


def test_a_memory_stop_says_where_the_state_is(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from fusegpt.utils import MemoryBudgetExceeded

    path, text = tiny_checkpoint
    out = tmp_path / "out"

    def over_budget(it):
        raise MemoryBudgetExceeded("stopped: the run used 9,999 MiB, over the --max-memory budget of 1 MiB")

    monkeypatch.setattr(fusion, "_after_iteration", over_budget)
    rc = main(["prune", "--model", str(path), "--calib", str(text), *FUSE, "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "over the --max-memory budget" in err and "Run state kept in" in err
    assert err.rstrip().endswith("--resume")


# ---------------------------------------------------------------- ReplaceMe: an underdetermined fit
def test_replaceme_refuses_an_underdetermined_map_before_loading(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    path, text = tiny_checkpoint
    _no_load(monkeypatch)
    argv = ["-q", "prune", "--model", str(path), "--method", "replaceme", "--sparsity", "0.3", "--calib", str(text),
            "--nsamples", "2", "--seqlen", "16", "--no-eval", "--output", str(tmp_path / "o")]
    _one_line(main(argv), capsys.readouterr().err, "underdetermined")
    _one_line(main([*argv[:5], "mi", *argv[6:], "--set", "linear_fold=ls", "--set", "fold_nsamples=2",
                    "--set", "fold_seqlen=16"]), capsys.readouterr().err, "underdetermined")


def test_a_rank_deficient_fit_is_refused_unless_regularised():
    from fusegpt.linear_map import LinearMapError, fit_spans
    from fusegpt.models import get_adapter

    a = get_adapter(tiny_model("llama"))
    window = torch.randint(1, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    calib = window.repeat(8, 1)  # 128 tokens, but only 16 distinct states: rank <= 16 < 64
    with pytest.raises(LinearMapError, match="span only"):
        fit_spans(a, calib, [(2, 4)])
    fit = fit_spans(a, calib, [(2, 4)], ridge=0.01)[0]
    assert fit.residual > 0.0


# ---------------------------------------------------------------- every check in the plan
def test_heal_on_a_layerwise_run_is_refused_before_loading(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    path, text = tiny_checkpoint
    _no_load(monkeypatch)
    out = tmp_path / "o"
    _one_line(main(_mi(path, text, out, "--offload", "disk", "--heal")), capsys.readouterr().err, "layer-wise")
    _one_line(main(_mi(path, text, out, "--offload", "disk", "--heal", "--dry-run")), capsys.readouterr().err,
              "layer-wise")
    from fusegpt.api import estimate_memory, resolve_configs
    from fusegpt.loading import model_config
    from fusegpt.methods import config_for

    cfgs = resolve_configs([config_for("mi", sparsity=0.3, calib_source=str(text), nsamples=2, seqlen=16)], "cpu")
    cfg = model_config(str(path))
    resident, layerwise = estimate_memory(cfg, cfgs).total, estimate_memory(cfg, cfgs, offload=True).total
    assert layerwise < resident
    budget = f"{(resident + layerwise) // 2}B"  # fits only layer-wise: --max-memory switches to it by itself
    _one_line(main(_mi(path, text, out, "--max-memory", budget, "--heal")), capsys.readouterr().err,
              "needs layer-wise execution")
    _one_line(main(_mi(path, text, out, "--heal", "--heal-set", "source=nosuchsource")), capsys.readouterr().err,
              "nosuchsource")
    _one_line(main(["-q", "prune", "--model", str(path), "--calib", str(text), *FUSE, "--output", str(out),
                    "--offload", "disk", "--set", "selection=fuse-trial"]), capsys.readouterr().err, "fuse-trial")
    assert not out.exists()


def test_text_too_short_is_refused_before_loading(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    path, text = tiny_checkpoint
    short = tmp_path / "short.txt"
    short.write_text("alpha beta")
    _no_load(monkeypatch)
    _one_line(main(_mi(path, short, tmp_path / "o")), capsys.readouterr().err, "fewer than nsamples × seqlen")
    _one_line(main(_mi(path, text, tmp_path / "o", "--heal", "--heal-set", f"source={short}")),
              capsys.readouterr().err, "heal nsamples × seqlen")


# ---------------------------------------------------------------- smaller ones
@pytest.mark.parametrize("extra, message", [
    (["--set", "early_barrier=1", "--set", "early_barrier=2"], "given twice"),
    (["--device", "meta"], "meta"),
])
def test_small_bad_inputs(tiny_checkpoint, tmp_path, monkeypatch, capsys, extra, message):
    path, text = tiny_checkpoint
    _no_load(monkeypatch)
    _one_line(main(_mi(path, text, tmp_path / "o", *extra)), capsys.readouterr().err, message)


def test_eval_limit_and_corrupt_config_and_foreign_report(tiny_checkpoint, tmp_path, capsys):
    import shutil

    path, _ = tiny_checkpoint
    _one_line(main(["eval", "--model", str(path), "--tasks", "proxies", "--limit", "-1"]), capsys.readouterr().err,
              "--limit")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "config.json").write_text('{"model_type": "llama", ')
    _one_line(main(["eval", "--model", str(bad), "--data", "wiki"]), capsys.readouterr().err,
              str(bad / "config.json"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "report.json").write_text('{"accuracy": 0.5, "epochs": [1, 2]}\n')
    pytest.importorskip("matplotlib")
    _one_line(main(["report", str(foreign)]), capsys.readouterr().err, "not a fusegpt report")


# ---------------------------------------------------------------- honest errors
def test_an_internal_error_keeps_its_traceback(tiny_checkpoint, tmp_path, monkeypatch):
    import fusegpt.api as api

    path, text = tiny_checkpoint

    def bug(*a, **k):
        raise ValueError("an internal bug, not bad input")

    monkeypatch.setattr(api, "compress", bug)
    with pytest.raises(ValueError, match="internal bug"):
        main(_mi(path, text, tmp_path / "o"))


def test_debug_shows_the_traceback_of_a_reported_error(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    path, text = tiny_checkpoint
    assert main(["--debug", *_mi(path, text, tmp_path / "o", "--device", "meta")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "fusegpt: error:" in err
    monkeypatch.setenv("FUSEGPT_DEBUG", "1")
    assert main(_mi(path, text, tmp_path / "o", "--device", "meta")) == 2
    assert "Traceback" in capsys.readouterr().err


def test_width_detection_does_not_swallow_an_adapter_bug(monkeypatch):
    from fusegpt.checkpoint.width import is_width_pruned_model
    from fusegpt.models.llama import LlamaAdapter

    model = tiny_model("llama")
    assert is_width_pruned_model(model) is False
    assert is_width_pruned_model(tiny_model("gpt2")) is False  # no LLaMA layout: not width-pruned, not an error

    def broken(self, block):
        raise AttributeError("a bug in the adapter")

    monkeypatch.setattr(LlamaAdapter, "linear_roles", broken)
    with pytest.raises(AttributeError, match="a bug in the adapter"):
        is_width_pruned_model(model)
