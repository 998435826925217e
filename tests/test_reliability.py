"""Nothing lost: every bad input, unwritable place or interruption gives one line (exit 2) before any
long work, or a warning where the work is kept; no command deletes a file fusegpt did not write.

Table-driven over the CLI on tiny models, plus fault injection (a save killed between writing and
renaming, a save that fails after the work, an unwritable place, a stale temporary).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusegpt.cli import main

from .conftest import one_line_error as _one_line_error

pytestmark = pytest.mark.usefixtures("single_thread")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _prune(path, text, out, *extra):
    return ["-q", "prune", "--model", str(path), "--method", "mi", "--sparsity", "0.3", "--calib", str(text),
            "--nsamples", "2", "--seqlen", "16", "--no-eval", "--output", str(out), *extra]


CASES = {
    # name: (argv builder(path, text, tmp) -> argv, message in the error line)
    "set_not_a_number": (lambda p, t, d: _prune(p, t, d / "o", "--set", "early_barrier=foo"), "early_barrier must be"),
    "set_fraction": (lambda p, t, d: _prune(p, t, d / "o", "--set", "early_barrier=1.5"), "early_barrier must be"),
    "set_unknown": (lambda p, t, d: _prune(p, t, d / "o", "--set", "nope=1"), "has setting(s) nope"),
    "set_twice": (lambda p, t, d: _prune(p, t, d / "o", "--set", "nsamples=8"), "both as a flag and with --set"),
    "set_sparsity": (lambda p, t, d: _prune(p, t, d / "o", "--set", "sparsity=0.2"), "with --sparsity"),
    "device_unknown": (lambda p, t, d: _prune(p, t, d / "o", "--device", "foo"), "unknown device"),
    "device_no_cuda": (lambda p, t, d: _prune(p, t, d / "o", "--device", "cuda"), "CUDA"),
    "eval_seqlen_context": (lambda p, t, d: ["-q", "prune", "--model", str(p), "--method", "mi", "--sparsity", "0.3",
                                             "--calib", str(t), "--nsamples", "2", "--seqlen", "16", "--output",
                                             str(d / "o"), "--eval-seqlen", "100000", "--max-tokens", "200000"],
                            "evaluation seqlen 100000 exceeds"),
    "calib_missing": (lambda p, t, d: _prune(p, d / "missing.txt", d / "o"), "does not exist"),
    "calib_unknown": (lambda p, t, d: _prune(p, "nosuchsource", d / "o"), "nosuchsource"),
    "output_is_file": (lambda p, t, d: _prune(p, t, d / "afile", "--overwrite"), "not a folder"),
    "output_under_a_file": (lambda p, t, d: _prune(p, t, d / "afile" / "sub"), "cannot write in"),
    "output_user_files": (lambda p, t, d: _prune(p, t, d / "user", "--overwrite"), "did not write"),
    "output_is_the_model": (lambda p, t, d: _prune(p, t, p, "--overwrite"), "input model"),
    "output_is_cwd": (lambda p, t, d: _prune(p, t, ".", "--overwrite"), "current folder"),
    "binary_text": (lambda p, t, d: _prune(p, d / "binary.txt", d / "o"), "not UTF-8 text"),
    "jsonl_undecodable": (lambda p, t, d: _prune(p, d / "bad.jsonl", d / "o"), "bad.jsonl"),
    "bench_zero_length": (lambda p, t, d: ["bench", "--model", str(p), "--lengths", "0"], "positive integers"),
    "bench_zero_batch": (lambda p, t, d: ["bench", "--model", str(p), "--batch-sizes", "0"], "positive integers"),
    "bench_nothing_measured": (lambda p, t, d: ["bench", "--model", str(p), "--lengths", "100000", "--repeats", "1",
                                                "--batch-sizes", "1"], "nothing was measured"),
    "export_existing": (lambda p, t, d: ["export", "--model", str(p), "--gguf", str(d / "afile")], "exists"),
    "export_unwritable": (lambda p, t, d: ["export", "--model", str(p), "--gguf", str(d / "afile" / "x.gguf")],
                          "cannot write in"),
    "report_not_json": (lambda p, t, d: ["report", str(d / "broken")], "is not valid JSON"),
    "heal_into_its_input": (lambda p, t, d: ["heal", "--model", str(p), "--output", str(p), "--overwrite"],
                            "input model"),
}


@pytest.fixture
def battery(tiny_checkpoint, tmp_path, monkeypatch):
    path, text = tiny_checkpoint
    (tmp_path / "afile").write_text("a file\n")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("my notes\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 200)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe\xfa not utf-8\n')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text('{"method": "mi", ')
    monkeypatch.chdir(tmp_path)
    return path, text, tmp_path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_nothing_written_input_untouched(case, battery, capsys, monkeypatch):
    import fusegpt.api
    import fusegpt.loading

    path, text, tmp = battery
    build, message = CASES[case]
    argv = build(path, text, tmp)
    if case.startswith(("set_", "device_", "eval_seqlen", "calib_", "output_", "binary", "jsonl")):
        def no_load(*a, **k):  # these must be refused before any model is loaded
            raise AssertionError("the model was loaded before the bad input was refused")
        monkeypatch.setattr(fusegpt.api, "load_model", no_load)
    if case.startswith("export"):
        monkeypatch.setattr("fusegpt.cli.prune.load_model", lambda *a, **k: (_ for _ in ()).throw(
            AssertionError("loaded before the output was checked")))
    before = _snapshot(tmp)
    rc = main(argv)
    _one_line_error(rc, capsys.readouterr().err, message)
    after = _snapshot(tmp)
    assert {k: v for k, v in after.items() if not k.startswith("tiny-llama")} == \
        {k: v for k, v in before.items() if not k.startswith("tiny-llama")} or case == "output_user_files"
    assert _snapshot(path) == {k[len("tiny-llama/"):]: v for k, v in before.items() if k.startswith("tiny-llama/")}
    assert (tmp / "user" / "notes.txt").read_text() == "my notes\n"


def test_truncated_weights_one_line(tiny_checkpoint, tmp_path, capsys):
    import shutil

    path, text = tiny_checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _one_line_error(main(_prune(bad, text, tmp_path / "o")), capsys.readouterr().err, "truncated or corrupt")
    _one_line_error(main(["eval", "--model", str(bad), "--data", str(text), "--seqlen", "16"]),
                    capsys.readouterr().err, "truncated or corrupt")
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_only_fusegpt_output(tiny_checkpoint, tmp_path, capsys):
    path, text = tiny_checkpoint
    out = tmp_path / "o"
    assert main(_prune(path, text, out)) == 0
    assert (out / ".fusegpt").is_file()
    assert main(_prune(path, text, out, "--overwrite")) == 0  # a previous output may be replaced
    (tmp_path / "empty").mkdir()
    assert main(_prune(path, text, tmp_path / "empty", "--overwrite")) == 0  # so may an empty folder


def test_stale_temporaries_are_cleaned_and_said(tiny_checkpoint, tmp_path, caplog):
    path, text = tiny_checkpoint
    stale = tmp_path / ".o.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    assert main(_prune(path, text, tmp_path / "o")) == 0
    assert not stale.exists() and "left by an interrupted save" in caplog.text


def test_save_killed_between_writing_and_renaming(tiny_checkpoint, tmp_path, monkeypatch):
    path, text = tiny_checkpoint
    out = tmp_path / "o"
    real = Path.rename

    def killed(self, target):
        if Path(target) == out:
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", killed)
    assert main(_prune(path, text, out)) == 130
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


def test_a_failed_save_keeps_the_pruned_model(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import fusegpt.api as api

    path, text = tiny_checkpoint
    real = api.save_pruned
    calls = {"n": 0}

    def disk_full(model, tok, out, report=None, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real(model, tok, out, report, **kw)

    monkeypatch.setattr(api, "save_pruned", disk_full)
    rc = main(_prune(path, text, tmp_path / "o"))
    err = capsys.readouterr().err
    _one_line_error(rc, err, "No space left on device", code=1)
    kept = Path(err.split("saved to ")[1].split(" instead")[0])
    assert (kept / "config.json").is_file() and json.loads((kept / "report.json").read_text())["method"] == "mi"
    assert not (tmp_path / "o").exists()


def test_eval_tasks_prints_first_then_warns_on_a_read_only_folder(tiny_checkpoint, tmp_path, monkeypatch, capsys,
                                                                  caplog):
    import fusegpt.cli.evaluate as ev

    path, text = tiny_checkpoint
    fake = {"tasks": {"t": {"acc": 0.5}}, "average": {"acc": 0.5}, "lm_eval_version": "x", "num_fewshot": 0,
            "limit": None}
    monkeypatch.setattr(ev, "run_zeroshot", lambda *a, **k: fake)

    def read_only(*a, **k):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(ev, "update_report", read_only)
    rc = main(["eval", "--model", str(path), "--tasks", "t"])
    cap = capsys.readouterr()
    assert rc == 0 and "t acc" in cap.out and "could not add the zero-shot results" in caplog.text


def test_resume_on_a_method_without_state_says_so(tiny_checkpoint, tmp_path, caplog):
    path, text = tiny_checkpoint
    assert main(_prune(path, text, tmp_path / "o", "--resume")) == 0
    assert "keep no run state" in caplog.text


def test_sweep_reruns_cells_whose_settings_changed(tiny_checkpoint, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="fusegpt")
    path, text = tiny_checkpoint
    args = ["-q", "sweep", "--model", str(path), "--methods", "mi", "--sparsity", "0.2", "--calib", str(text),
            "--seqlen", "16", "--eval-data", str(text), "--eval-seqlen", "16", "--max-tokens", "64", "--no-plots",
            "--output", str(tmp_path / "s")]
    assert main([*args, "--nsamples", "2"]) == 0
    assert main([*args, "--nsamples", "3"]) == 0
    rep = json.loads((tmp_path / "s" / "mi-0.2" / "report.json").read_text())
    assert rep["steps"][0]["config"]["nsamples"] == 3 and "nsamples: 2 -> 3" in caplog.text
    caplog.clear()
    assert main([*args, "--nsamples", "3"]) == 0
    assert "same settings, skipped" in caplog.text


def test_memory_guard_stops_a_run_over_budget():
    import gc
    import time

    import torch

    from fusegpt.utils import MemoryBudgetExceeded, MemoryGuard

    with pytest.raises(MemoryBudgetExceeded, match="over the --max-memory budget"):
        with MemoryGuard(1, interval=0.01):
            for _ in range(500):
                time.sleep(0.01)
    # only the run's own growth counts on top of the baseline: a large process is not stopped for
    # memory it held before, and an allocation that pushes the run over the budget is
    with MemoryGuard(300 * 2**20, interval=0.01, baseline_bytes=100 * 2**20):
        time.sleep(0.1)
    # Cyclic garbage left by earlier tests (models) freed by the collector while the guard runs would
    # shrink the RSS by more than this test allocates (seen once in a full suite on loaded cores):
    # collect it before the guard takes its starting RSS, and give the watcher up to 10 s.
    gc.collect()
    with pytest.raises(MemoryBudgetExceeded):
        with MemoryGuard(300 * 2**20, interval=0.01, baseline_bytes=100 * 2**20):
            big = torch.ones(300 * 2**20 // 4)
            for _ in range(1000):
                time.sleep(0.01)
            del big


def test_memory_guard_tripping_while_it_starts_is_not_a_keyboard_interrupt(monkeypatch):
    """A budget crossed before __enter__ returns (the watcher trips while Thread.start() waits) is a
    budget error, never a bare KeyboardInterrupt."""
    import _thread
    import threading

    from fusegpt.utils import MemoryBudgetExceeded, MemoryGuard

    real_start = threading.Thread.start

    def start_and_trip(self):
        real_start(self)
        g.tripped_mb = 1.0
        _thread.interrupt_main()
        for _ in range(100):  # the interrupt lands inside start(), as it did in CI
            pass

    g = MemoryGuard(10**15, interval=0.01)
    monkeypatch.setattr(threading.Thread, "start", start_and_trip)
    with pytest.raises(MemoryBudgetExceeded):
        with g:
            pass


def test_memory_guard_interrupt_as_the_work_ends_is_not_a_keyboard_interrupt():
    import _thread

    from fusegpt.utils import MemoryBudgetExceeded, MemoryGuard

    g = MemoryGuard(10**15, interval=0.01)
    with pytest.raises(MemoryBudgetExceeded):
        with g:
            g.tripped_mb = 1.0  # as if the watcher tripped right at the end of the work
            _thread.interrupt_main()


def _folder(path: Path, **files: str) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name.replace("_", ".")).write_text(text)
    return path


def test_gguf_conversion_publish_keeps_a_finished_copy_of_another_process(tmp_path):
    """Two processes converting the same GGUF at once: the second must not delete the first's folder."""
    from fusegpt.loading import _publish_conversion

    out = _folder(tmp_path / "model", config_json='{"from": "first"}')
    tmp = _folder(tmp_path / "model.tmp-x", config_json='{"from": "second"}')
    _publish_conversion(tmp, out)
    assert (out / "config.json").read_text() == '{"from": "first"}'
    assert not tmp.exists()
    # an incomplete folder (no config.json: a crash from before the atomic rename) is replaced
    partial = _folder(tmp_path / "other", model_safetensors="half")
    tmp2 = _folder(tmp_path / "other.tmp-y", config_json="{}")
    _publish_conversion(tmp2, partial)
    assert (partial / "config.json").is_file() and not (partial / "model.safetensors").exists()
    assert not tmp2.exists()
