"""Speed as a target: the cost model's fit, its cache, and prune --target-speedup picking sparsities."""

from __future__ import annotations

import json

import pytest

from fusegpt.cli import main
from fusegpt.speedmodel import CostModel, Shape

pytestmark = pytest.mark.usefixtures("single_thread")


def _shape(blocks=4, ffn=96, heads=4):
    return Shape((heads,) * blocks, (2,) * blocks, (ffn,) * blocks, 64, 16, 128)


def test_the_cost_model_recovers_its_coefficients_and_charges_irregular_widths():
    true = {"pp": [0.01, 0.002, 0.03, 0.05, 0.02], "tg": [0.02, 0.001, 0.01, 0.02, 0.04]}
    cm = CostModel("torch", "fp32", "x", "m", 1, 16, 4)
    shapes = [_shape(), _shape(blocks=2), _shape(ffn=32), _shape(heads=2), Shape((4,) * 4, (2,) * 4, (95, 80, 67, 50),
                                                                                   64, 16, 128), _shape(3, 64)]
    for s in shapes:
        cm.samples.append({"shape": s.to_dict(), **{t: float(s.features(32) @ true[t]) for t in ("pp", "tg")}})
    cm.fit()
    assert max(cm.fit_error().values()) < 1e-6
    dense = _shape()
    assert cm.speedup(dense, _shape(blocks=2))["pp"] > cm.speedup(dense, _shape(blocks=3))["pp"] > 1
    aligned, odd = _shape(ffn=64), _shape(ffn=63)  # one channel more is faster: the irregular width's cost
    assert cm.speedup(dense, aligned)["tg"] > cm.speedup(dense, odd)["tg"]


def test_calibrate_then_target_a_speedup(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from fusegpt.bench import calibrate

    monkeypatch.setenv("FUSEGPT_CACHE", str(tmp_path / "cache"))
    path, text = tiny_checkpoint
    base = ["prune", "--model", str(path), "--calib", str(text), "--nsamples", "2", "--seqlen", "16", "--no-eval",
            "--runtime", "torch", "--target-speedup", "1.25"]
    assert main([*base, "--method", "mi", "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "fusegpt bench --calibrate" in capsys.readouterr().err  # no cost model yet: says how to make one
    assert main(["bench", "--calibrate", "--runtime", "torch", "--model", str(path), "--rounds", "1",
                 "--prompt-tokens", "32", "--gen-tokens", "4", "--threads", "1"]) == 0
    assert "cost model: torch fp32" in capsys.readouterr().out
    from fusegpt.loading import model_config
    from fusegpt.speedmodel import load_cost_model

    cm = load_cost_model(model_config(str(path)), "torch", "f16", 1, "cpu")  # the one the CLI fitted and kept
    assert len(cm.samples) >= 5 and all(c >= 0 for t in ("pp", "tg") for c in cm.coef[t])
    assert calibrate(str(path), "torch", threads=1, rounds=1, n_prompt=32, n_gen=4).n_prompt == 32
    # timings of a tiny model on a shared CPU are noise; the targeting is tested on known coefficients
    from fusegpt.speedmodel import save_cost_model

    cm.coef = {"pp": [0.001, 0.0, 0.02, 0.05, 0.02], "tg": [0.002, 0.0001, 0.02, 0.04, 0.03]}
    save_cost_model(cm)
    assert main([*base, "--method", "mi", "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "speed target: 1.25x on both in torch" in out and "cost model: torch" in out
    assert main([*base, "--method", "mi", "--output", str(tmp_path / "mi")]) == 0
    rep = json.loads((tmp_path / "mi" / "report.json").read_text())
    chosen = rep["extra"]["speed_target"]["candidates"][0]
    assert min(chosen["predicted"].values()) >= 1.25 and rep["steps"][0]["config"]["sparsity"] == chosen["sparsities"][0]
    assert rep["layers_after"] == chosen["blocks_left"]

    assert main([*base, "--method", "mi+magnitude", "--speed-candidates", "2", "--output", str(tmp_path / "ch")]) == 0
    rep = json.loads((tmp_path / "ch" / "report.json").read_text())
    st = rep["extra"]["speed_target"]
    assert len(st["candidates"]) >= 1 and all(c["calib_loss"] is not None for c in st["candidates"])
    best = min(st["candidates"], key=lambda c: c["calib_loss"])
    assert st["chosen"] == best["sparsities"] and [s["config"]["sparsity"] for s in rep["steps"]] == best["sparsities"]
    assert main([*base, "--method", "magnitude+mi", "--output", str(tmp_path / "x"), "--dry-run"]) == 2
    assert "depth method followed by a width one" in capsys.readouterr().err
