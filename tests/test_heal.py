"""Recovery fine-tuning: lowers the loss on its data, merges back to a plain checkpoint that reloads."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fusegpt import HealConfig, heal
from fusegpt.cli import main

from .conftest import ToyTokenizer, load_stock, tiny_model

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")


def test_heal_lowers_the_loss_and_merges(text_file, tmp_path):
    from fusegpt.checkpoint import save_pruned

    model = tiny_model("llama")
    cfg = HealConfig(source=text_file, nsamples=8, seqlen=32, epochs=3, lr=5e-3, batch_size=4)
    healed, rec = heal(model, ToyTokenizer(), cfg)
    assert rec.loss_after < rec.loss_before and rec.steps == 6
    assert rec.settings["origins"]["lr"] == "explicit" and rec.settings["origins"]["lora_rank"] == "preset cpu"
    assert type(healed).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in healed.named_modules())
    assert all(isinstance(m, nn.Linear) for n, m in healed.named_modules() if n.endswith("q_proj"))
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = healed(ids).logits
    save_pruned(healed, None, tmp_path / "h")
    with torch.no_grad():
        torch.testing.assert_close(load_stock(tmp_path / "h", "llama")(ids).logits, ref, rtol=0, atol=0)


def test_cli_heal_after_prune_and_on_a_width_checkpoint(tiny_checkpoint, tmp_path, capsys):
    path, text = tiny_checkpoint
    common = ["--calib", str(text), "--nsamples", "2", "--seqlen", "32", "--eval-data", str(text),
              "--eval-seqlen", "32", "--max-tokens", "256"]
    heal_set = ["--heal-set", f"source={text}", "--heal-set", "nsamples=4", "--heal-set", "seqlen=32"]
    out = tmp_path / "mi"
    assert main(["-q", "prune", "--model", str(path), "--method", "mi", "--sparsity", "0.3", *common,
                 "--output", str(out), "--heal", *heal_set]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["heal"]["steps"] == 1 and set(rep["perplexity"]) == {"before", "after", "healed"}
    assert "healed" in capsys.readouterr().out
    slim = tmp_path / "slim"
    assert main(["-q", "prune", "--model", str(path), "--method", "slimgpt", "--sparsity", "0.3", *common,
                 "--output", str(slim), "--no-eval"]) == 0
    healed = tmp_path / "slim-healed"
    assert main(["-q", "heal", "--model", str(slim), "--output", str(healed), "--set", f"source={text}",
                 "--set", "nsamples=4", "--set", "seqlen=32", "--set", "epochs=2", "--eval-data", str(text),
                 "--eval-seqlen", "32", "--max-tokens", "256"]) == 0
    rep = json.loads((healed / "report.json").read_text())
    assert rep["method"] == "slimgpt" and rep["heal"]["loss_after"] < rep["heal"]["loss_before"]
    from fusegpt import load_pruned

    m, _ = load_pruned(healed)
    assert m.config.num_hidden_layers == 6


def test_heal_refuses_bad_settings():
    from fusegpt import ConfigError

    with pytest.raises(ConfigError, match="lr"):
        HealConfig(lr=0)
    with pytest.raises(ConfigError, match="unknown setting"):
        HealConfig().with_overrides(rank=4)
