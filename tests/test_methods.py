"""The method registry, typed presets, chains, --dry-run and the time estimate."""

from __future__ import annotations

import json

import pytest

import fusegpt
from fusegpt import ConfigError, configs_for, plan_run
from fusegpt.cli import main
from fusegpt.methods import registry
from fusegpt.settings import PruneConfig

from .conftest import tiny_config, tiny_model

ALL = ("shortgpt", "sleb", "mi", "mi+ft", "fusegpt", "replaceme", "slimgpt", "llm-pruner", "magnitude", "slicegpt")


def test_every_method_is_one_record():
    assert set(registry.names()) == set(ALL)
    for name in ALL:
        m = registry.get(name)
        assert m.config_cls.method == name and registry.method_of(m.config_cls()) is m
        assert m.summary and m.kind in ("depth", "width")
    assert registry.get("fusegpt").resumable and registry.get("mi+ft").resumable
    assert registry.get("sleb").continues_smaller and not registry.get("fusegpt").continues_smaller
    with pytest.raises(ConfigError, match="choose from"):
        registry.get("nope")


@pytest.mark.parametrize("name", ALL)
def test_every_method_has_paper_and_cpu_presets(name):
    cls = registry.get(name).config_cls
    assert set(cls.PRESETS) >= {"paper", "cpu"}
    cpu, paper = cls(sparsity=0.2).resolve("cpu"), cls(sparsity=0.2).resolve("cuda")
    assert cpu.preset == "cpu" and paper.preset == "paper"
    if name == "llm-pruner":  # its paper setting (10 × 64 tokens) is already CPU-sized
        assert cpu.nsamples * cpu.seqlen == paper.nsamples * paper.seqlen == 640
    elif name != "magnitude":  # the magnitude baseline reads no calibration data
        assert cpu.nsamples * cpu.seqlen < paper.nsamples * paper.seqlen
    assert all(v is not None for k, v in cpu.to_dict().items() if k not in ("ft_source",))


def test_unset_is_none_and_every_value_has_an_origin():
    cfg = fusegpt.SLEBConfig(sparsity=0.2, nsamples=4)
    assert cfg.seqlen is None and not cfg.is_resolved
    with pytest.raises(ConfigError, match="not resolved"):
        _ = cfg.calib
    r = cfg.resolve("cpu")
    assert (r.nsamples, r.seqlen, r.early_barrier) == (4, 128, 1)
    assert r.origins["nsamples"] == "explicit" and r.origins["seqlen"] == "preset cpu"
    assert r.origins["early_barrier"] == "default" and r.origins["preset"] == "default for cpu"
    assert r.to_dict()["calib"] == {"source": "wiki", "nsamples": 4, "seqlen": 128, "seed": 0}


def test_chain_parsing_longest_registered_name_first():
    assert registry.parse_chain("mi+ft") == ["mi+ft"]
    assert registry.parse_chain("mi+ft+slimgpt") == ["mi+ft", "slimgpt"]
    assert registry.parse_chain("mi+slimgpt") == ["mi", "slimgpt"]
    assert registry.parse_chain("fusegpt+slimgpt") == ["fusegpt", "slimgpt"]
    with pytest.raises(ConfigError, match="unknown method 'ft'"):
        registry.parse_chain("ft+mi")
    with pytest.raises(ConfigError, match="one sparsity per method"):
        configs_for("mi+ft+slimgpt", "0.25")
    cfgs = configs_for("mi+ft+slimgpt", "0.1,0.3", epochs=2, schedule="uniform", nsamples=4)
    assert [type(c).__name__ for c in cfgs] == ["MIFTConfig", "SlimGPTConfig"]
    assert cfgs[0].epochs == 2 and cfgs[1].schedule == "uniform" and cfgs[0].nsamples == cfgs[1].nsamples == 4
    with pytest.raises(ConfigError, match="no method in 'mi' has setting"):
        configs_for("mi", 0.2, epochs=2)


def test_dry_run_plan_from_the_config_alone(tmp_path):
    from fusegpt.checkpoint import save_pruned

    save_pruned(tiny_model("llama"), None, tmp_path / "m")
    cfgs = configs_for("mi+slimgpt", "0.2,0.4", nsamples=2, seqlen=16)
    plan = plan_run(str(tmp_path / "m"), cfgs)
    assert [c.method for c in plan.configs] == ["mi", "slimgpt"] and all(c.is_resolved for c in plan.configs)
    text = plan.describe()
    assert "preset cpu (default for cpu)" in text and "nsamples" in text and "explicit" in text
    assert "memory: about" in text and "time: about" in text
    assert plan.total_seconds > 0 and set(plan.seconds) == {"0-mi", "1-slimgpt"}
    # more calibration data, more time
    more = plan_run(str(tmp_path / "m"), configs_for("mi+slimgpt", "0.2,0.4", nsamples=8, seqlen=16))
    assert more.seconds["0-mi"] > plan.seconds["0-mi"]


@pytest.mark.parametrize("method, sparsity", [("shortgpt", "0.2"), ("sleb", "0.2"), ("mi", "0.2"), ("mi+ft", "0.2"),
                                              ("fusegpt", "0.2"), ("slimgpt", "0.3"), ("magnitude", "0.3"),
                                              ("mi+ft+slimgpt", "0.2,0.4"), ("mi+slimgpt", "0.2,0.4")])
def test_cli_dry_run_every_method_and_chain(method, sparsity, tiny_checkpoint, tmp_path, capsys):
    path, text = tiny_checkpoint
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(path), "--method", method, "--sparsity", sparsity, "--calib", str(text),
               "--nsamples", "2", "--seqlen", "16", "--eval-seqlen", "32", "--output", str(out), "--dry-run"])
    printed = capsys.readouterr().out
    assert rc == 0 and "dry run: nothing was loaded or written" in printed
    for step in registry.parse_chain(method):
        assert f": {step}, sparsity" in printed
    assert "time: about" in printed and "memory: about" in printed
    assert not out.exists() and not (tmp_path / "out.state").exists()


def test_cli_preset_cpu_keeps_explicit_lengths(tmp_path, capsys):
    """The issue's case: --preset cpu --nsamples 32 --seqlen 2048 runs 32 × 2048, not the preset's 8 × 256."""
    from fusegpt.checkpoint import save_pruned

    path = tmp_path / "m"
    save_pruned(tiny_model("llama", max_position_embeddings=4096), None, path)
    rc = main(["prune", "--model", str(path), "--method", "fusegpt", "--sparsity", "0.2", "--preset", "cpu",
               "--nsamples", "32", "--seqlen", "2048", "--output", str(tmp_path / "o"), "--dry-run", "--no-eval"])
    printed = capsys.readouterr().out
    assert rc == 0, capsys.readouterr().err
    lines = {ln.split()[0]: ln.split()[1:] for ln in printed.splitlines() if ln.startswith("    ")}
    assert lines["nsamples"] == ["32", "explicit"] and lines["seqlen"] == ["2048", "explicit"]
    assert lines["ft_seqlen"] == ["256", "preset", "cpu"]


def test_cli_runs_mi_ft_by_name(tiny_checkpoint, tmp_path, capsys):
    path, text = tiny_checkpoint
    out = tmp_path / "o"
    rc = main(["-q", "prune", "--model", str(path), "--method", "mi+ft", "--sparsity", "0.2", "--calib", str(text),
               "--nsamples", "2", "--seqlen", "16", "--set", "epochs=1", "--set", "ft_nsamples=2",
               "--set", "ft_seqlen=16", "--set", "group_size=3", "--set", "lora_rank=2", "--no-eval",
               "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "mi+ft" and len(rep["removed"]) == 2
    cfg = rep["steps"][0]["config"]
    assert cfg["epochs"] == 1 and cfg["origins"]["epochs"] == "explicit" and cfg["origins"]["loss"] == "preset cpu"
    assert rep["extra"]["estimate"]["seconds"]["0-mi+ft"] > 0


def test_estimates_come_from_the_records():
    from fusegpt import estimate_memory, estimate_seconds

    config = tiny_config("llama")
    est = estimate_memory(config, configs_for("mi+slimgpt", "0.2,0.4"))
    assert set(est.steps) == {"mi", "slimgpt", "save"}
    secs = estimate_seconds(config, configs_for("fusegpt", 0.2, epochs=2))
    secs4 = estimate_seconds(config, configs_for("fusegpt", 0.2, epochs=4))
    assert secs4["0-fusegpt"] > secs["0-fusegpt"] > 0


def test_a_new_method_is_one_record(tiny_checkpoint, monkeypatch, tmp_path):
    """Registering a record is all the CLI needs to run a method (dry run and real run)."""
    from dataclasses import dataclass
    from typing import ClassVar

    from fusegpt.methods.block_scoring import BlockPruneConfig

    @dataclass
    class DropLastConfig(BlockPruneConfig):
        method: ClassVar[str] = "droplast"

    def run(ctx, cfg, step):
        from fusegpt.blocks import remove_blocks

        step.add_iteration({}, remove_blocks(ctx.adapter, [ctx.adapter.num_layers - 2]))

    rec = registry.Method(name="droplast", config_cls=DropLastConfig, run=run,
                          estimate_memory=lambda g, cfg, env: {}, estimate_time=lambda g, cfg, env: 1.0,
                          summary="test")
    monkeypatch.setitem(registry._BY_NAME, "droplast", rec)
    monkeypatch.setitem(registry._BY_CONFIG, DropLastConfig, rec)
    path, text = tiny_checkpoint
    assert main(["-q", "prune", "--model", str(path), "--method", "droplast", "--sparsity", "0.1", "--calib",
                 str(text), "--no-eval", "--output", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["removed"] == [4]


def test_base_config_is_not_a_method():
    with pytest.raises(ConfigError, match="not a registered method"):
        fusegpt.compress(tiny_model("llama"), None, PruneConfig(sparsity=0.2))
