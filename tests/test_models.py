"""Adapters: the block-by-block path equals the stock forward; editing keeps the runtime consistent."""

import pytest
import torch

from fusegpt.blocks import remove_blocks
from fusegpt.models import get_adapter, supported_model_types

from .conftest import tiny_model


def test_adapter_forward_matches_stock(family, input_ids):
    model = tiny_model(family)
    a = get_adapter(model)
    with torch.no_grad():
        ref = model(input_ids).logits
        out = a.logits(a.run_blocks(a.embed(input_ids)))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_geometry(family):
    a = get_adapter(tiny_model(family))
    block = a.layers[0]
    assert a.num_heads(block) == 4 and a.num_kv_heads(block) == 2
    assert a.intermediate_size(block) == 96
    assert set(a.linear_roles(block)) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_unsupported_model_type_lists_supported():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported model type 'gpt_neox'") as e:
        get_adapter(model)
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert name in str(e.value)
    assert set(supported_model_types()) >= {"llama", "mistral", "qwen2", "qwen3"}


def test_remove_blocks_reindexes_and_generates(family, input_ids):
    model = tiny_model(family)
    a = get_adapter(model)
    types = list(getattr(model.config, "layer_types", None) or [])
    removed = remove_blocks(a, [1, 4])
    assert removed == [1, 4]
    assert a.num_layers == 4 == model.config.num_hidden_layers
    assert [blk.self_attn.layer_idx for blk in a.layers] == [0, 1, 2, 3]
    assert a.origin == [0, 2, 3, 5]
    if types:
        assert model.config.layer_types == [types[i] for i in (0, 2, 3, 5)]
    # a second removal reports original indices
    assert remove_blocks(a, [1]) == [2]
    with torch.no_grad():
        out = model.generate(input_ids[:1, :8], max_new_tokens=6, do_sample=False, use_cache=True)
        full = model(out).logits
    assert out.shape == (1, 14)
    # cached greedy decoding agrees with a no-cache forward over the same tokens
    assert torch.equal(full[0, 7:-1].argmax(-1), out[0, 8:])


def test_remove_blocks_rejects_bad_indices():
    a = get_adapter(tiny_model("llama"))
    with pytest.raises(ValueError, match="out of range"):
        remove_blocks(a, [6])
    with pytest.raises(ValueError, match="leave none"):
        remove_blocks(a, list(range(6)))


def test_context_prints_no_deprecation_warning():
    """Mask building must not print transformers' ``past_key_values`` FutureWarning into progress bars."""
    import warnings

    a = get_adapter(tiny_model("llama"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a.context(torch.zeros(1, 8, a.config.hidden_size))
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
