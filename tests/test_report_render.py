"""``fusegpt report``: Markdown + PNGs from report.json (block, fusion, width runs) and sweeps."""

import json

import pytest

from fusegpt.cli import main
from fusegpt.report import Report, StepReport
from fusegpt.report_render import PlotsUnavailable, layer_widths, render

pytest.importorskip("matplotlib")


def _block_report() -> Report:
    step = StepReport(method="mi", config={"method": "mi", "sparsity": 0.34})
    step.add_iteration({i: 0.1 * (i + 1) for i in range(6)}, [0])
    step.add_iteration({i: 0.2 * (6 - i) for i in range(1, 6)}, [5])
    return Report(model="tiny", seed=0, steps=[step], layers_before=6, layers_after=4, params_before=100,
                  params_after=70, perplexity={"before": {"wiki": 10.0}, "after": {"wiki": 12.5}},
                  extra={"zeroshot": {"tasks": {"wiki_lastword_proxy": {"acc": 0.4, "n": 10}}}})


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_block_run_heatmap_and_removal(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _block_report().save(run / "report.json")
    assert main(["report", str(run)]) == 0
    page = (run / "report.md").read_text()
    assert "![importance scores](report_step0_mi_scores.png)" in page
    assert "![removal order](report_step0_mi_removal.png)" in page
    assert "| ppl wiki | 10.000 | 12.500 |" in page and "wiki_lastword_proxy" in page
    assert "fusion" not in page and "widths" not in page  # absent data, no plot
    assert _is_png(run / "report_step0_mi_scores.png") and _is_png(run / "report_step0_mi_removal.png")


def test_fusion_and_width_plots(tmp_path):
    fuse = StepReport(method="fusegpt", config={})
    fuse.add_iteration({0: 0.3, 1: 0.1, 2: 0.2}, [1], group=[0, 1, 2], loss_start=1.0, loss_per_epoch=[0.5, 0.3])
    fuse.details["groups"] = [{"removed": 1, "group": [0, 1, 2], "loss_start": 1.0, "loss_per_epoch": [0.5, 0.3]}]
    width = StepReport(method="slimgpt", config={})
    width.details["layers"] = [{"layer": i, "heads": [4, 4 - i % 3], "kv_heads": [2, 2], "ffn": [96, 96 - 10 * i]}
                               for i in range(2)]
    rep = Report(model="tiny", steps=[fuse, width], layers_before=3, layers_after=2)
    run = tmp_path / "run"
    run.mkdir()
    rep.save(run / "report.json")
    page = render(run).read_text()
    assert "report_step0_fusegpt_fusion.png" in page and "report_step1_slimgpt_widths.png" in page
    assert _is_png(run / "report_step0_fusegpt_fusion.png") and _is_png(run / "report_step1_slimgpt_widths.png")


def test_widths_from_a_width_checkpoint_config():
    w = layer_widths(None, {"num_attention_heads": [4, 2], "num_key_value_heads": [2, 1],
                            "intermediate_size": [96, 48]})
    assert w["heads"] == [[None, 4], [None, 2]] and w["ffn"][1] == [None, 48]


def test_sweep_curves(tmp_path):
    table = {"dense": {"model": "tiny", "perplexity": {"wiki": 10.0, "news": 20.0}, "layers": 6, "params": 100},
             "eval_settings": {"seqlen": 32, "max_tokens": 64}, "methods": ["a", "b"], "sparsities": [0.25, 0.5],
             "rows": [{"method": m, "sparsity": s, "cell": f"{m}-{s}", "layers": 4, "params": 80, "removed": [1],
                       "perplexity": {"wiki": 10 + 10 * s * k, "news": 20 + 5 * s * k}, "wall_time_s": 1.0,
                       "peak_memory_mb": None, "calib": None, "zeroshot": None}
                      for k, m in enumerate(["a", "b"], 1) for s in (0.25, 0.5)]}
    (tmp_path / "sweep.json").write_text(json.dumps(table))
    page = render(tmp_path).read_text()
    assert "![perplexity vs sparsity](report_sweep_ppl.png)" in page and "| b |" in page
    assert _is_png(tmp_path / "report_sweep_ppl.png")


def test_errors(tmp_path, monkeypatch, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither report.json nor sweep.json" in capsys.readouterr().err
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _block_report().save(tmp_path / "report.json")
    with pytest.raises(PlotsUnavailable, match=r"fusegpt\[plots\]"):
        render(tmp_path)
