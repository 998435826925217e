"""CLI: the happy path on a tiny checkpoint, and one clear line + exit 2 for each bad input."""

import json

import pytest
from transformers import AutoModelForCausalLM

from fusegpt.cli import main


def _prune(path, text, out, *extra):
    return main(["-q", "prune", "--model", str(path), "--method", "mi", "--sparsity", "0.3", "--calib", str(text),
                 "--nsamples", "2", "--seqlen", "32", "--eval-data", str(text), "--eval-seqlen", "32",
                 "--max-tokens", "256", "--output", str(out), *extra])


def test_prune_then_eval_json(tiny_checkpoint, tmp_path, capsys):
    path, text = tiny_checkpoint
    out = tmp_path / "pruned"
    assert _prune(path, text, out) == 0
    printed = capsys.readouterr().out
    assert "ppl" in printed and "before" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "mi" and rep["layers_after"] == 4 and len(rep["removed"]) == 2
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    assert main(["eval", "--model", str(out), "--data", str(text), "--seqlen", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res["ppl"]) == {str(text)} and res["n_layers"] == 4 and res["params"] > 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_model", "does not exist"),
        ("sparsity_high", "sparsity must be a number in (0, 1)"),
        ("sparsity_all", "removes all"),
        ("empty_data", "is empty"),
        ("short_data", "fewer than nsamples × seqlen"),
        ("exists", "--overwrite"),
        ("seqlen", "exceeds the model's context"),
        ("method", "unknown method"),
        ("unsupported", "unsupported model type"),
    ],
)
def test_bad_input_one_line_exit_2(case, message, tiny_checkpoint, tmp_path, capsys):
    path, text = tiny_checkpoint
    out = tmp_path / "out"
    args = dict(model=str(path), method="mi", sparsity="0.25", calib=str(text), nsamples="2", seqlen="32")
    if case == "missing_model":
        args["model"] = str(tmp_path / "nope")
    elif case == "sparsity_high":
        args["sparsity"] = "1.5"
    elif case == "sparsity_all":
        args["sparsity"] = "0.99"
    elif case == "empty_data":
        (tmp_path / "e.txt").write_text("")
        args["calib"] = str(tmp_path / "e.txt")
    elif case == "short_data":
        args["nsamples"] = "1000"
    elif case == "exists":
        out.mkdir()
    elif case == "seqlen":
        args["seqlen"] = "100000"
    elif case == "method":
        args["method"] = "prune-everything"
    elif case == "unsupported":
        cfg = json.loads((path / "config.json").read_text())
        cfg["model_type"] = "gpt_neox"
        (path / "config.json").write_text(json.dumps(cfg))
    argv = ["prune", "--output", str(out), "--no-eval"]
    for k, v in args.items():
        argv += [f"--{k}", v]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fusegpt: error:") and message in err[-1]
    if case != "exists":
        assert not out.exists()


def test_failure_midway_leaves_no_output(tiny_checkpoint, tmp_path, monkeypatch):
    import dataclasses

    from fusegpt.methods import MIConfig, registry

    path, text = tiny_checkpoint

    def boom(*a, **k):
        raise RuntimeError("killed midway")

    broken = dataclasses.replace(registry.get("mi"), run=boom)
    monkeypatch.setitem(registry._BY_NAME, "mi", broken)
    monkeypatch.setitem(registry._BY_CONFIG, MIConfig, broken)
    with pytest.raises(RuntimeError):
        _prune(path, text, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_help_mentions_methods(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "shortgpt" in capsys.readouterr().out


def test_eval_needs_no_adapter_pruning_does(tmp_path, capsys):
    """A causal LM fusegpt has no adapter for (GPT-NeoX): eval measures it; prune says why it cannot."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from .conftest import byte_tokenizer

    cfg = AutoConfig.for_model("gpt_neox", vocab_size=259, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=96, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "neox")
    byte_tokenizer().save_pretrained(tmp_path / "neox")
    text = tmp_path / "t.txt"
    text.write_text("alpha beta gamma delta " * 400)
    assert main(["eval", "--model", str(tmp_path / "neox"), "--data", str(text), "--seqlen", "64", "--max-tokens",
                 "512", "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"][str(text)]
    assert 1 < ppl < 1e4
    assert main(["prune", "--model", str(tmp_path / "neox"), "--method", "mi", "--sparsity", "0.5", "--calib",
                 str(text), "--output", str(tmp_path / "o")]) == 2
    assert "pruning needs an adapter" in capsys.readouterr().err and not (tmp_path / "o").exists()
