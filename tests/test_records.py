"""Typed, versioned records: declared settings, the report's schema, recipes that re-run a run exactly."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from fusegpt.cli import main
from fusegpt.heal import HealConfig
from fusegpt.methods import registry
from fusegpt.report import SCHEMA_VERSION, HealResult, Report, StepReport
from fusegpt.settings import ConfigError, Spec, describe_settings

pytestmark = pytest.mark.usefixtures("single_thread")

ALL_CONFIGS = [registry.get(n).config_cls for n in registry.names()] + [HealConfig]


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_every_setting_is_declared_once_with_bounds_and_help(cls):
    specs = cls.specs()
    assert set(specs) == {f.name for f in fields(cls)}, "a setting without a declared Spec"
    for name, spec in specs.items():
        assert spec.help and spec.bounds(), name
    # every default and preset value passes its own declaration
    for name, value in {**cls.defaults(), **{k: v for p in cls.PRESETS.values() for k, v in p.items()}}.items():
        if name in specs:
            specs[name].check(name, value)


def test_one_checker_for_every_kind():
    s = Spec("float", "x", low=0.0, high=1.0, open_low=True)
    s.check("x", 1.0)
    with pytest.raises(ConfigError, match=r"x must be a number in \(0, 1\], got 0"):
        s.check("x", 0.0)
    with pytest.raises(ConfigError, match="must be an integer >= 1, got 1.5"):
        Spec("int", "n", low=1).check("n", 1.5)
    with pytest.raises(ConfigError, match="True or False"):
        Spec("bool", "b").check("b", 1)
    with pytest.raises(ConfigError, match="choose from a, b"):
        Spec("choice", "c", choices=("a", "b")).check("c", "z")
    with pytest.raises(ConfigError, match="nan"):
        Spec("float", "f").check("f", float("nan"))


def test_set_help_lists_the_settings(tiny_checkpoint, capsys):
    assert main(["prune", "--method", "fusegpt", "--set", "help"]) == 0
    out = capsys.readouterr().out
    assert "lr_coef" in out and "a number >= 0" in out and "learning rate of the fusion coefficients" in out
    assert "[paper=0.001, cpu=0.01]" in out
    assert main(["prune", "--method", "mi+slimgpt", "--output", "x", "--set", "help", "--heal"]) == 0
    out = capsys.readouterr().out
    assert "slimgpt settings" in out and "head_rule" in out and "healing settings" in out
    assert describe_settings(HealConfig).count("\n") >= 2 * len(HealConfig.specs()) - 1


def test_settings_reload_from_their_record():
    from fusegpt.methods import FuseGPTConfig

    cfg = FuseGPTConfig(sparsity=0.25, epochs=2, preset="cpu").resolve("cpu")
    again = FuseGPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.explicit() == {"sparsity": 0.25, "epochs": 2, "preset": "cpu"}
    assert again.resolve("cpu").to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="unknown setting"):
        FuseGPTConfig.from_dict({**cfg.to_dict(), "nope": 1})
    with pytest.raises(ConfigError, match="newer"):
        FuseGPTConfig.from_dict({**cfg.to_dict(), "format": 99})


# ---------------------------------------------------------------- the report's schema
def _report() -> Report:
    from fusegpt.fusion import GroupResult

    step = StepReport(method="mi", config={"method": "mi", "sparsity": 0.5})
    g = GroupResult(loss_start=1.0, loss_per_epoch=[0.5], group=[0, 1, 2], removed=1)
    step.add_iteration({0: 0.3, 1: 0.1, 2: 0.2}, [1], **{k: v for k, v in g.to_dict().items() if k != "removed"})
    step.details["groups"] = [g.to_dict()]
    return Report(model="m", steps=[step], layers_before=3, layers_after=2, perplexity={"before": {"wiki": 10.0},
                  "after": {"wiki": 12.0}}, heal=HealResult(settings={"lr": 1e-4}, loss_before=3.0, loss_after=2.5))


def test_report_round_trips_with_its_schema_version(tmp_path):
    from fusegpt.fusion import GroupResult

    r = _report()
    r.save(tmp_path / "report.json")
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["schema_version"] == SCHEMA_VERSION and d["heal"]["loss_after"] == 2.5 and d["resumed"] is False
    back = Report.load(tmp_path / "report.json")
    assert back.to_dict() == d
    assert GroupResult.from_dict(back.steps[0].details["groups"][0]).loss_per_epoch == [0.5]


def test_an_older_report_loads_with_the_current_names(tmp_path, caplog):
    v1 = {"model": "m", "seed": 0, "steps": [{"method": "mi", "config": {}, "removed": [1], "iterations": [],
                                             "details": {}, "wall_time_s": 1.0, "peak_memory_mb": None,
                                             "removed_sorted": [1]}],
          "perplexity": {"before_heal": {"wiki": 12.0}, "after_heal": {"wiki": 11.0}},
          "extra": {"heal": {"settings": {}, "loss_before": 3.0, "loss_after": 2.0, "loss_per_epoch": [2.0],
                             "steps": 4, "wall_time_s": 1.0}},
          "method": "mi", "removed": [1], "removed_sorted": [1], "from_the_future": 1}
    (tmp_path / "r.json").write_text(json.dumps(v1))
    r = Report.load(tmp_path / "r.json")
    assert r.perplexity == {"after": {"wiki": 12.0}, "healed": {"wiki": 11.0}}
    assert r.heal is not None and r.heal.steps == 4 and "heal" not in r.extra
    assert r.extra["unknown"] == {"from_the_future": 1} and "from_the_future" in caplog.text
    (tmp_path / "n.json").write_text(json.dumps({**v1, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ValueError, match="upgrade fusegpt"):
        Report.load(tmp_path / "n.json")


# ---------------------------------------------------------------- recipes
FUSE = ["--method", "fusegpt", "--sparsity", "0.3", "--nsamples", "2", "--seqlen", "16", "--no-eval",
        "--preset", "cpu", "--set", "epochs=1", "--set", "ft_nsamples=4", "--set", "ft_seqlen=16",
        "--set", "group_size=3", "--set", "lora_rank=2", "--set", "coef_rank=2", "--set", "val_nsamples=1"]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_run_reproduces_from_its_report(tiny_checkpoint, tmp_path, capsys):
    path, text = tiny_checkpoint
    first = tmp_path / "first"
    assert main(["prune", "--model", str(path), "--calib", str(text), *FUSE, "--output", str(first)]) == 0
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["prune", "--recipe", str(first / "report.json"), "--no-eval", "--output", str(again)]) == 0
    err = capsys.readouterr().err
    assert "same settings, versions and device" in err
    a, b = _weights(first), _weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r1, r2 = (json.loads((p / "report.json").read_text()) for p in (first, again))
    assert r1["removed"] == r2["removed"] and r1["steps"][0]["config"] == r2["steps"][0]["config"]

    # through a YAML recipe, with one setting changed: the run says where it differs
    recipe = tmp_path / "r.yaml"
    assert main(["recipe", str(first), "--output", str(recipe)]) == 0
    assert "method: fusegpt" in recipe.read_text() and "epochs: 1" in recipe.read_text()
    capsys.readouterr()
    assert main(["prune", "--recipe", str(recipe), "--no-eval", "--output", str(tmp_path / "y"), "--dry-run"]) == 0
    assert main(["prune", "--recipe", str(first / "report.json"), "--no-eval", "--output", str(tmp_path / "z"),
                 "--set", "epochs=2", "--dry-run"]) == 0
    assert "step 1 (fusegpt): epochs was 1, now 2" in capsys.readouterr().err


def test_recipe_refusals(tiny_checkpoint, tmp_path, capsys):
    path, text = tiny_checkpoint
    (tmp_path / "bad.yaml").write_text("fusegpt_recipe: 1\nsteps: []\n")
    assert main(["prune", "--recipe", str(tmp_path / "bad.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert "non-empty 'steps'" in capsys.readouterr().err
    assert main(["prune", "--recipe", str(tmp_path / "bad.yaml"), "--method", "mi", "--output", "o"]) == 2
    assert "drop --method" in capsys.readouterr().err
    assert main(["prune", "--output", str(tmp_path / "o")]) == 2
    assert "give --method and either --sparsity or --target-speedup" in capsys.readouterr().err
