"""Up-front memory estimate: the formula's parts scale as documented; --max-memory refuses with the figure."""

from __future__ import annotations

import pytest
import torch

from fusegpt import EvalConfig, config_for
from fusegpt.api import estimate_memory
from fusegpt.memory import MemoryEstimate, ModelGeometry, check_budget, format_size, parse_size

from .conftest import tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is much faster


def test_parse_and_format_sizes():
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("16") == parse_size(16) == 16 * 10**9
    assert format_size(1.5e9) == "1.50 GB"
    with pytest.raises(ValueError, match="cannot read memory size"):
        parse_size("lots")


def test_weights_and_scaling():
    config = tiny_config("llama")
    n_params = sum(p.numel() for p in tiny_model("llama").parameters())
    mi = estimate_memory(config, config_for("mi", sparsity=0.2, nsamples=4, seqlen=64))
    assert mi.weights == 4 * n_params
    assert estimate_memory(config, config_for("mi", sparsity=0.2), dtype=torch.bfloat16).weights == 2 * n_params
    # cached states: (L+1)·T·h·b for one window
    assert mi.steps["mi"]["cached states"] == 7 * 64 * 64 * 4
    longer = estimate_memory(config, config_for("mi", sparsity=0.2, nsamples=4, seqlen=128))
    assert longer.total > mi.total
    # SlimGPT caches every window: doubling nsamples doubles the cached states
    s1 = estimate_memory(config, config_for("slimgpt", sparsity=0.2, nsamples=8, seqlen=64))
    s2 = estimate_memory(config, config_for("slimgpt", sparsity=0.2, nsamples=16, seqlen=64))
    assert s2.steps["slimgpt"]["cached states"] == 2 * s1.steps["slimgpt"]["cached states"]
    # FuseGPT's group training holds more than MI ranking; a chain peaks at its largest step
    fuse = estimate_memory(config, config_for("fusegpt", sparsity=0.2))
    assert fuse.peak_step == "fusegpt group training"
    chain = estimate_memory(config, [config_for("mi", sparsity=0.1), config_for("fusegpt", sparsity=0.1)],
                            eval_config=EvalConfig(seqlen=64))
    assert set(chain.steps) == {"mi", "fusegpt MI ranking", "fusegpt group training", "perplexity", "save"}
    assert chain.total == chain.runtime + chain.weights + max(sum(p.values()) for p in chain.steps.values())


def test_every_family_and_a_loaded_model(any_family):
    est = estimate_memory(tiny_model(any_family), config_for("mi", sparsity=0.2))
    assert est.total > est.weights > 0
    g = ModelGeometry.of(tiny_config(any_family))  # from the config alone, on the meta device
    assert g.params * 4 == est.weights


def test_check_budget_refuses_with_the_figure():
    est = MemoryEstimate(weights=3 * 10**9, steps={"mi": {"cached states": 10**9}}, runtime=0)
    check_budget(est, "5GB")
    with pytest.raises(MemoryError, match=r"needs about 4.00 GB .*budget of 2.00 GB"):
        check_budget(est, "2GB")


def test_cli_max_memory_refuses_before_loading(tmp_path, capsys):
    from fusegpt.checkpoint import save_pruned
    from fusegpt.cli import main

    save_pruned(tiny_model("llama"), None, tmp_path / "m")
    rc = main(["prune", "--model", str(tmp_path / "m"), "--method", "fusegpt", "--sparsity", "0.2",
               "--output", str(tmp_path / "out"), "--no-eval", "--max-memory", "1MB"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "budget of 1.00 MB" in err
    assert not (tmp_path / "out").exists()
