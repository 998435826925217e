"""Adapter conformance: every registered family behaves the same through the adapter API.

For each family (tiny random config): the block-by-block path equals the stock forward; removing a
block leaves a model that runs, generates with a KV cache and reloads from its saved checkpoint
with stock transformers and identical logits; the scorers run; the roles are linear layers with
``nn.Linear`` weight semantics. Fusion and head pruning join when their modules exist.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusegpt.blocks import remove_blocks
from fusegpt.checkpoint import save_pruned
from fusegpt.importance import bi_scores, mi_scores
from fusegpt.models import ROLES, get_adapter, supported_model_types

from .conftest import ALL_FAMILIES, load_stock, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is much faster

FUSED_ROLES = ("qkv_proj", "gate_up_proj")  # Phi-3 and GPT-2 keep these projections fused


def test_every_registered_family_is_in_the_suite():
    assert set(supported_model_types()) == set(ALL_FAMILIES)


def test_forward_matches_stock(any_family, input_ids):
    model = tiny_model(any_family)
    with torch.no_grad():
        ref = model(input_ids).logits
        a = get_adapter(model)
        out = a.logits(a.run_blocks(a.embed(input_ids)))
        again = model(input_ids).logits  # creating the adapter does not change the function
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)


def test_roles_are_linear_layers(any_family):
    a = get_adapter(tiny_model(any_family))
    x = torch.randn(3, a.config.hidden_size)
    for block in a.layers:
        roles = a.linear_roles(block)
        assert set(roles) <= set(ROLES) | set(FUSED_ROLES)
        assert {"o_proj", "down_proj"} <= set(roles)
        for role, lin in roles.items():
            assert isinstance(lin, nn.Linear), role
            a.set_linear(block, role, lin)  # setting a role back is a no-op
            assert a.linear_roles(block)[role] is lin
        # weight semantics [out, in]: the attention input and output projections chain
        for role in ("q_proj", "qkv_proj", "up_proj", "gate_up_proj"):
            if role in roles:
                torch.testing.assert_close(roles[role](x), F.linear(x, roles[role].weight, roles[role].bias))
                assert roles[role].in_features == a.config.hidden_size
        assert roles["down_proj"].out_features == a.config.hidden_size
        assert roles["down_proj"].in_features == a.intermediate_size(block)
        assert a.num_heads(block) * a.head_dim == roles["o_proj"].in_features
        assert a.num_heads(block) % a.num_kv_heads(block) == 0
        assert all(any(p.requires_grad for p in n.parameters()) for n in a.norm_modules(block))


def test_remove_block_generate_save_reload(any_family, input_ids, tmp_path):
    model = tiny_model(any_family)
    a = get_adapter(model)
    assert remove_blocks(a, [1, 4]) == [1, 4]
    assert a.num_layers == 4 == model.config.get_text_config().num_hidden_layers
    assert a.origin == [0, 2, 3, 5]
    with torch.no_grad():
        ref = model(input_ids).logits
        torch.testing.assert_close(a.logits(a.run_blocks(a.embed(input_ids))), ref, rtol=0, atol=0)
        out = model.generate(input_ids[:1, :8], max_new_tokens=6, do_sample=False, use_cache=True)
        full = model(out).logits
    assert out.shape == (1, 14)
    assert torch.equal(full[0, 7:-1].argmax(-1), out[0, 8:])  # cached decoding agrees with no cache
    save_pruned(model, None, tmp_path / "ckpt")
    reloaded = load_stock(tmp_path / "ckpt", any_family)
    assert reloaded.config.get_text_config().num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, ref, rtol=0, atol=0)


def test_scorers_run(any_family, input_ids):
    a = get_adapter(tiny_model(any_family))
    calib = input_ids[:, :16]
    for scores in (bi_scores(a, calib), mi_scores(a, calib, candidates=[1, 2])):
        assert scores.shape == (a.num_layers,)
    assert torch.isfinite(bi_scores(a, calib)).all()
    assert torch.isfinite(mi_scores(a, calib, candidates=[1, 2])[[1, 2]]).all()


# ---------------------------------------------------------------- fusion and width, when present
def _module_or_skip(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        pytest.skip(f"{name} does not exist yet (FuseGPT / SlimGPT are being written)")


def test_fuse_a_block(any_family, input_ids, tmp_path):
    """FuseGPT's contract: same roles in every block, FusedLinear settable, merged model reloads."""
    _module_or_skip("fusegpt.methods.fusegpt")
    from fusegpt.fusion import FusedLinear, frozen_weight
    from fusegpt.methods.fusegpt.loop import merge_model

    model = tiny_model(any_family)
    a = get_adapter(model)
    p, student = 2, (1, 3)
    p_roles = a.linear_roles(a.layers[p])
    torch.manual_seed(0)
    for j in student:
        assert set(a.linear_roles(a.layers[j])) == set(p_roles)
        for role, lin in a.linear_roles(a.layers[j]).items():
            fl = FusedLinear.from_linear(lin, lora_rank=2)
            w, b = frozen_weight(p_roles[role])
            fl.add_term(w, fused_bias=b, rank=2)
            with torch.no_grad():  # as if trained: every factor non-zero
                for q in (q for group in fl.trainable() for q in group):
                    q.normal_(0, 0.1)
            a.set_linear(a.layers[j], role, fl)
    remove_blocks(a, [p])
    with torch.no_grad():
        fused = model(input_ids).logits
        assert merge_model(a) == len(student) * len(p_roles)
        merged = model(input_ids).logits
    assert not any(isinstance(m, FusedLinear) for m in model.modules())
    torch.testing.assert_close(merged, fused, rtol=1e-4, atol=1e-4)
    save_pruned(model, None, tmp_path / "fused")
    with torch.no_grad():
        torch.testing.assert_close(load_stock(tmp_path / "fused", any_family)(input_ids).logits, merged,
                                   rtol=0, atol=0)


def test_prune_a_head(any_family, input_ids):
    """SlimGPT's contract: plain q/k/v/o + gate/up/down roles, or a clear refusal."""
    _module_or_skip("fusegpt.width")
    from fusegpt import ConfigError
    from fusegpt.width import apply_head_pruning, block_width

    a = get_adapter(tiny_model(any_family))
    block = a.layers[0]
    roles = a.linear_roles(block)
    if not set(ROLES) <= set(roles):  # fused (Phi-3, GPT-2) or gate-less (OPT) layouts
        with pytest.raises(ConfigError, match="width pruning needs"):
            block_width(a, block)
        return
    w = block_width(a, block)
    g = w.n_heads // w.n_kv
    keep = [k * g for k in range(w.n_kv)]  # one query head per K/V group
    apply_head_pruning(a, block, keep, list(range(w.n_kv)))
    assert a.num_heads(block) == len(keep) and a.num_kv_heads(block) == w.n_kv
    with torch.no_grad():
        assert a.logits(a.run_blocks(a.embed(input_ids))).shape == (*input_ids.shape, a.config.vocab_size)


def test_compress_fusegpt_end_to_end(any_family, toy_tokenizer, input_ids, tmp_path):
    """The whole FuseGPT run (MI ranking, fusion, group training, merge) through ``compress``."""
    from fusegpt import api, config_for

    model = tiny_model(any_family)
    cfg = config_for("fusegpt", sparsity=0.2, nsamples=2, seqlen=32, ft_nsamples=4, ft_seqlen=32, epochs=1,
                     group_size=3)
    model, report = api.compress(model, toy_tokenizer, cfg)
    assert len(report.removed) == 2 and model.config.get_text_config().num_hidden_layers == 4
    with torch.no_grad():
        ref = model(input_ids).logits
    save_pruned(model, None, tmp_path / "fused")
    with torch.no_grad():
        torch.testing.assert_close(load_stock(tmp_path / "fused", any_family)(input_ids).logits, ref,
                                   rtol=0, atol=0)


def test_replaceme_or_a_clear_refusal(any_family, toy_tokenizer, input_ids, tmp_path):
    """ReplaceMe's contract: a block output of input stream + down projection, or LinearMapError saying why."""
    from fusegpt import ConfigError, api, config_for
    from fusegpt.linear_map import LinearMapError

    model = tiny_model(any_family)
    cfg = config_for("replaceme", sparsity=0.2, nsamples=2, seqlen=32)
    try:
        model, report = api.compress(model, toy_tokenizer, cfg)
    except (LinearMapError, ConfigError) as e:  # refused in the plan (Gemma 2/3) or on the first window
        assert "down projection" in str(e) or "norm after the FFN" in str(e)
        return
    assert len(report.removed) == 2 and 0 not in report.removed
    with torch.no_grad():
        ref = model(input_ids).logits
    save_pruned(model, None, tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(load_stock(tmp_path / "rm", any_family)(input_ids).logits, ref, rtol=0, atol=0)


def test_llm_pruner_or_a_clear_refusal(any_family, toy_tokenizer, input_ids, tmp_path):
    from fusegpt import ConfigError, api, config_for, load_pruned

    model = tiny_model(any_family)
    cfg = config_for("llm-pruner", sparsity=0.2, nsamples=2, seqlen=32, keep_first=1, keep_last=1)
    try:
        model, report = api.compress(model, toy_tokenizer, cfg)
    except ConfigError as e:
        assert "width pruning needs" in str(e)
        return
    with torch.no_grad():
        ref = model(input_ids).logits
    save_pruned(model, None, tmp_path / "lp", report)
    back, _ = load_pruned(tmp_path / "lp")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids).logits, ref, rtol=0, atol=0)


def test_slicegpt_or_a_clear_refusal(any_family, toy_tokenizer, input_ids, tmp_path):
    """SliceGPT's contract: pre-norm RMSNorm blocks are rotated and sliced and reload exactly; any other
    family is refused with the reason, unchanged."""
    from fusegpt import api, config_for, load_pruned
    from fusegpt.slicing import SliceError

    model = tiny_model(any_family)
    try:
        model, report = api.compress(model, toy_tokenizer, config_for("slicegpt", sparsity=0.2, nsamples=2, seqlen=32))
    except SliceError as e:
        assert any(w in str(e) for w in ("RMSNorm", "pre-norm", "LLaMA-layout", "attn(norm(x))")), e
        return
    assert report.steps[0].details["sparsity_achieved"] >= 0.2
    with torch.no_grad():
        ref = model(input_ids).logits
    save_pruned(model, None, tmp_path / "sg", report)
    back, _ = load_pruned(tmp_path / "sg")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids).logits, ref, rtol=0, atol=0)


def test_uniform_width_is_a_stock_checkpoint_or_a_clear_refusal(any_family, toy_tokenizer, input_ids, tmp_path):
    """layout=uniform: every block the same heads, K/V heads and FFN width, written into the config, so
    stock from_pretrained rebuilds the pruned model with identical logits (no fusegpt code)."""
    import json

    from fusegpt import ConfigError, api, config_for

    model = tiny_model(any_family)
    cfg = config_for("slimgpt", sparsity=0.3, nsamples=2, seqlen=32, layout="uniform")
    try:
        model, report = api.compress(model, toy_tokenizer, cfg)
    except ConfigError as e:
        assert "width pruning needs" in str(e)
        return
    assert report.steps[0].details["layout"] == "uniform"
    with torch.no_grad():
        ref = model(input_ids).logits
    save_pruned(model, None, tmp_path / "u", report)
    saved = json.loads((tmp_path / "u" / "config.json").read_text())
    assert "fusegpt" not in saved["model_type"] and "fusegpt_widths" not in saved
    back = load_stock(tmp_path / "u", any_family)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids).logits, ref, rtol=0, atol=0)
