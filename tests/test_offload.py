"""Layer-wise execution: an offloaded model gives the same scores, removals, weights and perplexity."""

from __future__ import annotations

import pytest
import torch

from fusegpt import api, config_for
from fusegpt.eval.perplexity import perplexity
from fusegpt.importance import bi_scores, mi_scores
from fusegpt.models import get_adapter
from fusegpt.offload import offloader_of
from fusegpt.offload.layerwise import attach, load_offloaded

from .conftest import ALL_FAMILIES, ToyTokenizer, tiny_model

RUN = dict(epochs=1, batch_size=2, ft_nsamples=4, ft_seqlen=16, group_size=4, lora_rank=4, nsamples=2, seqlen=16,
           loss="mse")


pytestmark = pytest.mark.usefixtures("single_thread")


def _ids(n=3, t=24, seed=1):
    return torch.randint(1, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _state(model):
    off = offloader_of(model)
    a = get_adapter(model)
    if off is None:
        return {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    with a.using(range(a.num_layers)):
        out = {k: v.clone() for k, v in model.state_dict().items()}
    return out


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_blocks_live_in_the_store_and_come_in_when_used(storage, tmp_path):
    model = tiny_model("llama")
    ids = _ids()
    ref = perplexity(model, ids.flatten(), 24)
    off = attach(model, "cpu", storage, tmp_path / "store" if storage == "disk" else None)
    a = get_adapter(model)
    assert all(p.is_meta for p in a.layers.parameters())
    assert not a.embed_tokens.weight.is_meta
    if storage == "disk":
        assert len(list((tmp_path / "store").glob("block-*.safetensors"))) == a.num_layers
    got = perplexity(model, ids.flatten(), 24)
    assert got == pytest.approx(ref, rel=1e-6)
    assert off.loads == a.num_layers  # each block came in once for all windows
    assert all(p.is_meta for p in a.layers.parameters())  # and went back out


@pytest.mark.parametrize("fam", ALL_FAMILIES)
def test_scores_equal_resident(fam):
    model = tiny_model(fam)
    calib = _ids(2, 16)
    a = get_adapter(model)
    ref_mi, ref_bi = mi_scores(a, calib), bi_scores(a, calib)
    attach(model, "cpu", "cpu")
    torch.testing.assert_close(mi_scores(get_adapter(model), calib), ref_mi, rtol=0, atol=0)
    torch.testing.assert_close(bi_scores(get_adapter(model), calib), ref_bi, rtol=0, atol=0)


@pytest.mark.parametrize("method,extra", [
    ("mi", {}), ("sleb", {}), ("fusegpt", {"coef_rank": 4, "lr_base": 1e-3}), ("mi+ft", {"lr": 1e-3}),
    ("slimgpt", {}), ("replaceme", {"spans": 2}), ("replaceme", {"solver": "cosine"}),
    ("replaceme", {"span_choice": "residual"}),
    ("shortgpt", {"linear_fold": "ls", "fold_nsamples": 4, "fold_seqlen": 32}),
    ("mi+ft", {"lr": 1e-3, "linear_fold": "ls", "fold_nsamples": 4, "fold_seqlen": 32}),
])
def test_methods_give_the_same_model_offloaded(method, extra, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusegpt import load_pruned
    from fusegpt.checkpoint import save_pruned

    settings = {"sparsity": 0.3, "calib_source": text_file, "nsamples": 2, "seqlen": 16, **extra}
    if method in ("fusegpt", "mi+ft"):
        settings.update({k: v for k, v in RUN.items()})
    if method == "slimgpt":
        settings["sparsity"] = 0.2
    if method == "replaceme":  # a 64 × 64 least-squares map needs at least 64 calibration tokens
        settings["nsamples"] = 8
    cfg = config_for(method, **settings)
    ref, ref_rep = api.compress(tiny_model("llama"), ToyTokenizer(), cfg)
    model = tiny_model("llama")
    attach(model, "cpu", "disk", tmp_path / "store")
    model, rep = api.compress(model, ToyTokenizer(), cfg)
    assert rep.removed == ref_rep.removed
    want, got = _state(ref), _state(model)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    ids = _ids()
    out = save_pruned(model, ToyTokenizer(), tmp_path / "out", rep)
    if method == "slimgpt":
        stock, _ = load_pruned(out)
    else:
        assert (out / "model.safetensors.index.json").is_file()
        stock = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_load_offloaded_reads_blocks_lazily(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    lazy = load_offloaded(tmp_path / "ckpt", storage="disk", folder=tmp_path / "store")
    a = get_adapter(lazy)
    assert all(p.is_meta for p in a.layers.parameters())
    assert lazy.lm_head.weight is a.embed_tokens.weight
    assert not list((tmp_path / "store").glob("*.safetensors"))  # nothing copied until a block is edited
    ids = _ids()
    ref = perplexity(model, ids.flatten(), 24)
    assert perplexity(lazy, ids.flatten(), 24) == pytest.approx(ref, rel=1e-6)


def test_layerwise_resume_after_kill(text_file, tmp_path, monkeypatch):
    """A layer-wise FuseGPT run killed after block 2 resumes to the uninterrupted run's model."""
    from fusegpt.methods.fusegpt import loop as fusion

    kw = dict(sparsity=0.5, calib_source=text_file, **RUN, coef_rank=4, lr_base=1e-3)
    ref, ref_rep = api.compress(tiny_model("llama"), ToyTokenizer(), config_for("fusegpt", **kw))
    state = tmp_path / "state"

    def kill(it):
        if it == 1:
            raise KeyboardInterrupt("killed after the 2nd block")

    monkeypatch.setattr(fusion, "_after_iteration", kill)
    model = tiny_model("llama")
    attach(model, "cpu", "disk")
    with pytest.raises(KeyboardInterrupt):
        api.compress(model, ToyTokenizer(), config_for("fusegpt", **kw), state_dir=state)
    assert (state / "0-fusegpt" / "blocks" / "0.pt").is_file()
    monkeypatch.setattr(fusion, "_after_iteration", lambda it: None)
    model = tiny_model("llama")
    attach(model, "cpu", "disk")
    model, rep = api.compress(model, ToyTokenizer(), config_for("fusegpt", **kw), state_dir=state, resume=True)
    assert rep.removed == ref_rep.removed and len(rep.steps[0].iterations) == 3
    want, got = _state(ref), _state(model)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_estimate_layerwise_keeps_only_the_blocks_in_use():
    from fusegpt.api import estimate_memory as estimate_for_run
    from fusegpt.api import plan_offload

    model = tiny_model("llama", num_hidden_layers=12)
    cfgs = [config_for("fusegpt", sparsity=0.25, group_size=4, ft_nsamples=4, ft_seqlen=16, max_terms=1)]
    res = estimate_for_run(model, cfgs)
    lw = estimate_for_run(model, cfgs, offload=True)
    blocks = sum(p.numel() for p in get_adapter(model).layers.parameters()) * 4
    assert res.weights - lw.weights == blocks
    assert lw.total < res.total
    assert plan_offload(model, cfgs, res.total + 1) is None
    assert plan_offload(model, cfgs, (res.total + lw.total) // 2) == "disk"
    with pytest.raises(MemoryError, match="layer-wise"):
        plan_offload(model, cfgs, lw.total - 1)


def test_cli_max_memory_switches_to_layerwise(tiny_checkpoint, tmp_path, caplog, monkeypatch):
    import contextlib

    from transformers import AutoModelForCausalLM

    import fusegpt.api

    # the budget here is sized from the estimates of a tiny model; the test process itself is larger,
    # so the run-time guard (tested on its own) is switched off
    monkeypatch.setattr(fusegpt.api, "MemoryGuard", lambda *a, **k: contextlib.nullcontext())
    from fusegpt.api import estimate_memory as estimate_for_run
    from fusegpt.cli import main

    path, text = tiny_checkpoint
    args = ["prune", "--model", str(path), "--method", "mi", "--sparsity", "0.34", "--calib", str(text),
            "--nsamples", "2", "--seqlen", "16", "--no-eval"]
    cfgs = [config_for("mi", sparsity=0.34, calib_source=str(text), nsamples=2, seqlen=16)]
    model = AutoModelForCausalLM.from_pretrained(path)
    budget = (estimate_for_run(model, cfgs).total + estimate_for_run(model, cfgs, offload=True).total) // 2
    assert main([*args, "--output", str(tmp_path / "resident")]) == 0
    assert main([*args, "--output", str(tmp_path / "lw"), "--max-memory", f"{budget}b"]) == 0
    assert "running layer-wise" in caplog.text
    assert (tmp_path / "lw" / "model.safetensors.index.json").is_file()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "resident").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "lw").eval()
    ids = torch.randint(1, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=0, atol=0)


def test_cli_offload_flags(tiny_checkpoint, tmp_path, capsys):
    from fusegpt.cli import main

    path, text = tiny_checkpoint
    base = ["prune", "--model", str(path), "--method", "fusegpt", "--sparsity", "0.2", "--calib", str(text),
            "--nsamples", "2", "--seqlen", "16", "--no-eval", "--output", str(tmp_path / "o")]
    assert main([*base, "--offload", "disk", "--device-map", "auto"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["eval", "--model", str(path), "--offload", "disk", "--tasks", "hellaswag"]) == 2
    assert "cannot use --offload" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    sets = ["--set", "epochs=1", "--set", "ft_nsamples=2", "--set", "ft_seqlen=16", "--set", "group_size=3",
            "--set", "lora_rank=2", "--set", "coef_rank=2"]
    assert main([*base, "--offload", "disk", "--offload-folder", str(tmp_path / "store"), *sets]) == 0
    rep = __import__("json").loads((tmp_path / "o" / "report.json").read_text())
    assert len(rep["removed"]) == 2
    assert not list((tmp_path / "store").glob("*.safetensors"))  # edited blocks cleaned up after saving


def test_cli_device_map_through_accelerate(tiny_checkpoint, tmp_path):
    """The accelerate path on CPU: a JSON device map places every module (one device here)."""
    from transformers import AutoModelForCausalLM

    from fusegpt.cli import main

    path, text = tiny_checkpoint
    dm = tmp_path / "map.json"
    dm.write_text('{"": "cpu"}')
    args = ["prune", "--model", str(path), "--method", "mi", "--sparsity", "0.34", "--calib", str(text),
            "--nsamples", "2", "--seqlen", "16", "--no-eval"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert main([*args, "--output", str(tmp_path / "b"), "--device-map", str(dm)]) == 0
    assert main([*args, "--output", str(tmp_path / "c"), "--device-map", "nonsense"]) == 2
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    ids = torch.randint(1, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=0, atol=0)


def test_device_map_that_offloads_is_refused():
    from fusegpt.loading import _check_device_map

    model = tiny_model("llama")
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu"}
    with pytest.raises(ValueError, match="--offload disk"):
        _check_device_map(model)
    model.hf_device_map = {"": "cpu"}
    _check_device_map(model)


@pytest.mark.parametrize("fam", ALL_FAMILIES)
def test_layerwise_checkpoint_reloads_in_stock_transformers(fam, text_file, tmp_path):
    from fusegpt.checkpoint import save_pruned

    from .conftest import load_stock

    cfg = config_for("mi", sparsity=0.34, calib_source=text_file, nsamples=2, seqlen=16)
    ref, _ = api.compress(tiny_model(fam), ToyTokenizer(), cfg)
    model = tiny_model(fam)
    attach(model, "cpu", "disk")
    model, rep = api.compress(model, ToyTokenizer(), cfg)
    out = save_pruned(model, None, tmp_path / "out", rep)
    stock = load_stock(out, fam)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)


def test_cli_eval_layerwise_and_dtype(tiny_checkpoint, capsys):
    import json

    from fusegpt.cli import main

    path, text = tiny_checkpoint
    base = ["eval", "--model", str(path), "--data", str(text), "--seqlen", "32", "--max-tokens", "256", "--json"]
    res = {}
    for name, extra in {"fp32": [], "lw": ["--offload", "disk"], "bf16": ["--offload", "cpu", "--dtype", "bfloat16"]}.items():
        assert main([*base, *extra]) == 0
        res[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"][str(text)]
    assert res["lw"] == pytest.approx(res["fp32"], rel=1e-6)
    assert res["bf16"] == pytest.approx(res["fp32"], rel=0.05) and res["bf16"] != res["fp32"]


def test_offload_drops_fused_caches():
    from torch import nn

    from fusegpt.fusion import FusedLinear

    model = tiny_model("llama")
    a = get_adapter(model)
    block = a.layers[0]
    fl = FusedLinear.from_linear(a.linear_roles(block)["q_proj"], 2)
    a.set_linear(block, "q_proj", fl)
    off = attach(model, "cpu", "cpu")
    with off.use([block]), torch.no_grad():
        fl(torch.randn(1, 3, fl.in_features))
        assert fl._cache is not None
    assert fl._cache is None and isinstance(fl.lora_A, nn.Parameter) and fl.lora_A.is_meta


def test_load_offloaded_bf16_matches_stock(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).eval()
    lazy = load_offloaded(tmp_path / "ckpt", dtype=torch.bfloat16, storage="cpu")
    a = get_adapter(lazy)
    assert a.dtype == torch.bfloat16
    assert a.decoder.rotary_emb.inv_freq.dtype == stock.model.rotary_emb.inv_freq.dtype
    ids = _ids()
    assert perplexity(lazy, ids.flatten(), 24) == perplexity(stock, ids.flatten(), 24)


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_removed_blocks_leave_the_store(fam, tmp_path):
    """One keep_layers for every family: removing blocks of an offloaded model drops them from its
    store (GPT-2's own copy used to keep them)."""
    from fusegpt.blocks import remove_blocks

    model = tiny_model(fam)
    off = attach(model, "cpu", "disk", tmp_path / "store")
    a = get_adapter(model)
    assert len(list((tmp_path / "store").glob("*.safetensors"))) == 6
    assert remove_blocks(a, [1, 3]) == [1, 3] and a.origin == [0, 2, 4, 5]
    assert len(list((tmp_path / "store").glob("*.safetensors"))) == 4
    assert model.config.num_hidden_layers == 4
    with torch.no_grad():
        assert torch.isfinite(a.logits(a.run_blocks(a.embed(_ids())))).all()
    off.close()
