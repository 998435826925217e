"""The embedded SmolLM2-135M on a little real text (marked ``real``; about a minute in all)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fusegpt import EvalConfig, compress, config_for, evaluate, load_model, save_pruned
from fusegpt.loading import embedded_gguf_path, resolve_model_path

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def embedded():
    return load_model()


def test_gguf_path_resolves_to_cached_conversion():
    path = resolve_model_path(str(embedded_gguf_path()))
    assert Path(path, "config.json").is_file()


def test_embedded_model_is_sane(embedded):
    model, tok = embedded
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ppl = evaluate(model, tok, EvalConfig(data=("wiki",), seqlen=256, max_tokens=1024))["wiki"]
    assert 5 < ppl < 60, ppl  # a working 135M model on Wikipedia text


def test_prune_real_model_and_reload(embedded, tmp_path):
    import copy

    model, tok = embedded
    model = copy.deepcopy(model)
    cfg = config_for("mi", sparsity=0.05, nsamples=2, seqlen=64, seed=0)  # ceil(30·0.05) = 2 blocks
    model, rep = compress(model, tok, cfg)
    assert rep.layers_after == 28 and len(rep.removed) == 2
    out = save_pruned(model, tok, tmp_path / "out", rep)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok("The history of the city begins", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
