"""Tiny random models built from configs (no network, seconds each)."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def tiny_config(model_type: str = "llama", **overrides):
    """A seeded tiny config of ``model_type`` (llama, mistral, qwen2, qwen3)."""
    from transformers import AutoConfig

    kw = dict(TINY)
    if model_type == "qwen3":
        kw["head_dim"] = 16
    if model_type == "mistral":
        kw["sliding_window"] = 32
    if model_type == "qwen2":
        kw.update(use_sliding_window=True, sliding_window=32, max_window_layers=3)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="sdpa")
    return model.eval()


class ToyTokenizer:
    """Whitespace-free byte tokenizer for the tiny models (ids < 128), enough for data tests."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, return_tensors=None, **_):
        ids = [b % 127 + 1 for b in text.encode("utf-8")]
        t = torch.tensor([ids])
        return {"input_ids": t}

    def encode(self, text, **_):
        return [b % 127 + 1 for b in text.encode("utf-8")]

    def save_pretrained(self, path):
        pass


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def toy_tokenizer():
    return ToyTokenizer()


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 128, (2, 40), generator=g)
