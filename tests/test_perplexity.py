"""Perplexity follows the GPTQ protocol exactly."""

import math

import pytest
import torch
import torch.nn.functional as F

from fusegpt.eval.perplexity import perplexity

from .conftest import tiny_model


def _manual(model, tokens, seqlen):
    n = tokens.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(n):
            w = tokens[i * seqlen : (i + 1) * seqlen][None]
            logits = model(w).logits
            nlls.append(F.cross_entropy(logits[0, :-1], w[0, 1:]) * seqlen)
    return math.exp(float(torch.stack(nlls).sum()) / (n * seqlen))


def test_gptq_protocol_drops_tail_and_matches_manual():
    model = tiny_model("llama")
    tokens = torch.randint(1, 128, (16 * 5 + 7,), generator=torch.Generator().manual_seed(0))
    ppl = perplexity(model, tokens, seqlen=16)
    assert abs(ppl - _manual(model, tokens, 16)) < 1e-3
    # batching does not change the result; the token cap truncates before windowing
    assert abs(perplexity(model, tokens, seqlen=16, batch_size=3) - ppl) < 1e-3
    assert abs(perplexity(model, tokens, seqlen=16, max_tokens=40) - _manual(model, tokens[:40], 16)) < 1e-3


def test_too_few_tokens():
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_model("llama"), torch.arange(10), seqlen=16)
