"""compress() with each block method, atomic checkpoints that stock transformers reloads exactly."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusegpt import EvalConfig, compress, config_for, save_pruned
from fusegpt.checkpoint import OutputExistsError, atomic_write_dir
from fusegpt.report import Report


@pytest.mark.parametrize("method", ["shortgpt", "sleb", "mi"])
def test_compress_save_reload_identical(method, tiny_checkpoint, tmp_path):
    path, text = tiny_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = config_for(method, sparsity=0.34, calib_source=str(text), nsamples=4, seqlen=32, seed=3)
    model, report = compress(model, tok, cfg, eval_config=EvalConfig(data=(str(text),), seqlen=32))
    assert report.layers_before == 6 and report.layers_after == 3 and len(report.removed) == 3
    assert report.params_after < report.params_before
    assert set(report.perplexity) == {"before", "after"}
    steps = report.steps[0]
    assert len(steps.iterations) == (1 if method == "shortgpt" else 3)
    if method == "sleb":  # barriers: the first and last blocks are never candidates
        assert not {0, 5} & set(report.removed)
    out = save_pruned(model, tok, tmp_path / "out", report)
    saved = json.loads((out / "report.json").read_text())
    assert saved["removed"] == report.removed and saved["removed_sorted"] == sorted(report.removed)
    assert saved["steps"][0]["config"]["calib"]["seed"] == 3 and "torch" in saved["versions"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 3
    ids = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
        gen = reloaded.generate(ids[:1, :5], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 10)
    assert Report.load(out / "report.json").removed == report.removed


def test_same_seed_same_blocks(tiny_checkpoint):
    path, text = tiny_checkpoint
    removed = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        _, rep = compress(model, tok, config_for("mi", sparsity=0.5, calib_source=str(text), nsamples=2, seqlen=32))
        removed.append(rep.removed)
    assert removed[0] == removed[1]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def boom(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError):
        atomic_write_dir(tmp_path / "out", boom)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        atomic_write_dir(tmp_path / "out", lambda t: None)
    atomic_write_dir(tmp_path / "out", lambda t: (t / "x").write_text("1"), overwrite=True)
    assert (tmp_path / "out" / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
