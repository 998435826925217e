"""Sweeps: each cell pruned once from the same dense model, resumed, tabulated (tiny model)."""

import json

import pytest

from fusegpt import ConfigError
from fusegpt.cli import main
from fusegpt.sweep import collect, sweep_configs, to_markdown

pytestmark = pytest.mark.usefixtures("single_thread")


def _sweep(path, text, out, *extra):
    return main(["-q", "sweep", "--model", str(path), "--methods", "shortgpt,mi", "--sparsity", "0.2,0.4",
                 "--calib", str(text), "--nsamples", "2", "--seqlen", "32", "--eval-data", str(text),
                 "--eval-seqlen", "32", "--max-tokens", "256", "--output", str(out), "--no-plots", *extra])


def test_sweep_table_and_resume(tiny_checkpoint, tmp_path, capsys):
    path, text = tiny_checkpoint
    out = tmp_path / "sweep"
    assert _sweep(path, text, out) == 0
    table = json.loads((out / "sweep.json").read_text())
    assert [(r["method"], r["sparsity"]) for r in table["rows"]] == [
        ("shortgpt", 0.2), ("shortgpt", 0.4), ("mi", 0.2), ("mi", 0.4)]
    assert {r["layers"] for r in table["rows"]} == {4, 3}  # ceil(6·0.2)=2, ceil(6·0.4)=3
    assert all(r["perplexity"][str(text)] > 1 for r in table["rows"])
    assert table["dense"]["layers"] == 6 and table["dense"]["perplexity"][str(text)] > 1
    md = (out / "sweep.md").read_text()
    assert "| dense |" in md and "| mi |" in md and "0.4" in md
    # each cell is a stock checkpoint with its report; its "before" is the dense evaluation
    rep = json.loads((out / "mi-0.4" / "report.json").read_text())
    assert rep["perplexity"]["before"] == table["dense"]["perplexity"]
    assert (out / "mi-0.4" / "config.json").is_file()
    # resume: finished cells are not pruned again (their reports stay byte-identical)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*/report.json")}
    (out / "mi-0.4" / "report.json").unlink()
    import shutil

    shutil.rmtree(out / "mi-0.4")
    capsys.readouterr()
    assert _sweep(path, text, out) == 0
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/report.json")}
    assert set(after) == {"shortgpt-0.2", "shortgpt-0.4", "mi-0.2", "mi-0.4"}
    assert all(before.get(k) in (None, v) for k, v in after.items())
    table2 = json.loads((out / "sweep.json").read_text())
    assert table2["rows"][3]["removed"] == table["rows"][3]["removed"]  # continued from the saved mi-0.2
    rep = json.loads((out / "mi-0.4" / "report.json").read_text())
    assert rep["extra"]["sweep"]["continued_from"] == "mi-0.2" and len(rep["steps"][0]["iterations"]) == 3
    assert rep["steps"][0]["config"]["sparsity"] == 0.4 and rep["layers_before"] == 6
    # continuing the greedy removal gives what a run from scratch gives
    from fusegpt import compress, config_for
    from fusegpt.loading import load_model

    model, tok = load_model(str(path))
    _, scratch = compress(model, tok, config_for("mi", sparsity=0.4, nsamples=2, seqlen=32, calib_source=str(text)))
    assert scratch.removed == rep["removed"]
    assert [it["scores"] for it in scratch.to_dict()["steps"][0]["iterations"]] == \
        [it["scores"] for it in rep["steps"][0]["iterations"]]


def test_sweep_without_checkpoints(tiny_checkpoint, tmp_path):
    path, text = tiny_checkpoint
    out = tmp_path / "sweep"
    assert main(["-q", "sweep", "--model", str(path), "--methods", "shortgpt", "--sparsity", "0.3",
                 "--calib", str(text), "--nsamples", "2", "--seqlen", "32", "--eval-data", str(text),
                 "--eval-seqlen", "32", "--max-tokens", "128", "--output", str(out), "--no-checkpoints",
                 "--no-plots"]) == 0
    assert sorted(p.name for p in (out / "shortgpt-0.3").iterdir()) == [".fusegpt", "report.json"]
    assert collect(out)["rows"][0]["cell"] == "shortgpt-0.3"  # cells found without naming them


def test_sweep_with_zero_shot(tiny_checkpoint, tmp_path):
    from .test_zeroshot import _write_tasks

    path, text = tiny_checkpoint
    out = tmp_path / "sweep"
    assert _sweep(path, text, out, "--tasks", "tiny_mc", "--include-path", str(_write_tasks(tmp_path / "tasks")),
                  "--limit", "2", "--no-checkpoints") == 0
    table = json.loads((out / "sweep.json").read_text())
    assert 0 <= table["dense"]["zeroshot"]["tiny_mc"]["acc"] <= 1
    assert all("acc_norm" in r["zeroshot"]["tiny_mc"] for r in table["rows"])
    assert "| mi-0.4 |" in (out / "sweep.md").read_text().split("Zero-shot")[1]


def test_sweep_settings_pass_through():
    cfgs = sweep_configs(["shortgpt", "sleb"], [0.25], {"nsamples": 4, "seqlen": 64, "early_barrier": 2})
    assert all(c.resolve().calib.nsamples == 4 and c.resolve().calib.seqlen == 64 for c in cfgs.values())
    assert cfgs[("sleb", 0.25)].early_barrier == 2 and cfgs[("shortgpt", 0.25)].early_barrier == 2
    assert cfgs[("sleb", 0.25)].resolve().origins["early_barrier"] == "explicit"
    with pytest.raises(ConfigError, match="no method in this sweep has"):
        sweep_configs(["shortgpt"], [0.25], {"no_such_key": 1})
    with pytest.raises(ConfigError, match="unknown method"):
        sweep_configs(["nope"], [0.25])


def test_sweep_bad_sparsity_one_line(tiny_checkpoint, tmp_path, capsys):
    path, text = tiny_checkpoint
    rc = main(["sweep", "--model", str(path), "--methods", "mi", "--sparsity", "0.2,x", "--output", str(tmp_path / "s")])
    assert rc == 2 and "--sparsity" in capsys.readouterr().err


def test_markdown_shape():
    table = {"dense": {"model": "m", "perplexity": {"wiki": 10.0, "news": 20.0}, "layers": 4, "params": 100},
             "eval_settings": {"seqlen": 32, "max_tokens": 64}, "methods": ["a"], "sparsities": [0.25, 0.5],
             "rows": [{"method": "a", "sparsity": 0.25, "cell": "a-0.25", "perplexity": {"wiki": 12.0, "news": 25.0},
                       "layers": 3, "params": 80, "removed": [2], "wall_time_s": 1.0, "peak_memory_mb": 5.0,
                       "calib": None, "zeroshot": {"x_proxy": {"acc": 0.5}}}]}
    md = to_markdown(table)
    assert "| Method | 0.25 wiki | 0.25 news | 0.5 wiki | 0.5 news |" in md
    assert "| a | 12.00 | 25.00 | – | – |" in md and "x_proxy" in md


def test_zeroshot_brief_reads_both_report_shapes():
    """A cell's report may hold zeroshot() output ({"tasks": ...}) or the flat map `fusegpt eval --tasks` merges."""
    from fusegpt.sweep import _zs_brief

    flat = {"wiki_lastword_proxy": {"acc": 0.3, "settings": {}}, "news_continuation_proxy": {"acc": 0.4, "acc_norm": 0.5}}
    want = {"wiki_lastword_proxy": {"acc": 0.3}, "news_continuation_proxy": {"acc": 0.4, "acc_norm": 0.5}}
    assert _zs_brief(flat) == want
    assert _zs_brief({"tasks": flat, "average": {"acc": 0.35}}) == want
    assert _zs_brief(None) is None


def test_sweep_compares_the_width_peers(tiny_checkpoint, tmp_path):
    """SlimGPT, LLM-Pruner and SliceGPT side by side in one sweep; every cell's checkpoint reloads."""
    from fusegpt import load_pruned

    path, text = tiny_checkpoint
    out = tmp_path / "sweep"
    assert main(["-q", "sweep", "--model", str(path), "--methods", "slimgpt,llm-pruner,slicegpt", "--sparsity", "0.2",
                 "--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--eval-data", str(text),
                 "--eval-seqlen", "32", "--max-tokens", "128", "--output", str(out), "--no-plots",
                 "--set", "keep_first=1", "--set", "keep_last=1"]) == 0
    rows = {r["cell"]: r for r in collect(out)["rows"]}
    assert set(rows) == {"slimgpt-0.2", "llm-pruner-0.2", "slicegpt-0.2"}
    for cell in rows:
        model, _ = load_pruned(out / cell)
        assert model is not None


def test_sweep_quality_vs_speed_table(tiny_checkpoint, tmp_path):
    from fusegpt.bench import pareto
    from fusegpt.sweep import quality_vs_speed

    path, text = tiny_checkpoint
    out = tmp_path / "sweep"
    assert _sweep(path, text, out, "--speed", "torch", "--speed-rounds", "2") == 0
    table = json.loads((out / "sweep.json").read_text())
    speeds = table["speed"]["torch"]
    assert set(speeds) == {"dense", "shortgpt-0.2", "shortgpt-0.4", "mi-0.2", "mi-0.4"}
    assert speeds["dense"]["pp"] == pytest.approx(1.0) and speeds["mi-0.4"]["ideal"] == pytest.approx(2.0)
    pts = quality_vs_speed(table, "torch", str(text))
    assert len(pts) == 5 and any(p["front"] for p in pts)
    assert pts == sorted(pts, key=lambda p: -min(p["pp"], p["tg"]))
    assert "Quality vs speed in torch" in (out / "sweep.md").read_text()
    assert pareto([(1.0, 10.0), (1.5, 12.0), (1.4, 13.0), (2.0, 20.0)]) == [True, True, False, True]
    assert _sweep(path, text, tmp_path / "s2", "--speed", "llamacpp:q3_k") == 2  # refused before any work
