"""Scorers: cached prefixes give the same scores; each score matches its definition."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fusegpt.blocks import remove_blocks
from fusegpt.importance import bi_scores, candidate_blocks, lowest, mi_scores, sleb_scores
from fusegpt.models import get_adapter

from .conftest import tiny_model


@pytest.fixture
def calib():
    return torch.randint(1, 128, (3, 24), generator=torch.Generator().manual_seed(3))


def _without(model, i):
    m = copy.deepcopy(model)
    remove_blocks(get_adapter(m), [i])
    return m


def test_mi_cached_prefix_equals_recompute(family, calib):
    a = get_adapter(tiny_model(family))
    s1 = mi_scores(a, calib, batch_size=2, cache_prefix=True)
    s2 = mi_scores(a, calib, batch_size=2, cache_prefix=False)
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-6)


def test_mi_matches_definition(calib):
    model = tiny_model("llama")
    a = get_adapter(model)
    scores = mi_scores(a, calib, candidates=[2, 3])
    assert torch.isnan(scores[0]) and torch.isnan(scores[5])
    with torch.no_grad():
        ref = model(calib, output_hidden_states=True).hidden_states[-1]  # after final norm: not what MI uses
        last = a.run_blocks(a.embed(calib))
        for i in (2, 3):
            skipped = get_adapter(_without(model, i))
            out = skipped.run_blocks(skipped.embed(calib))
            want = 1 - F.cosine_similarity(out, last, dim=-1).mean()
            assert abs(float(scores[i]) - float(want)) < 1e-5
    assert not torch.allclose(ref, last)  # MI is taken before the final norm


def test_sleb_is_loss_without_block(calib):
    model = tiny_model("qwen2")
    scores = sleb_scores(get_adapter(model), calib, candidates=[1, 4], batch_size=3)
    for i in (1, 4):
        with torch.no_grad():
            loss = _without(model, i)(calib, labels=calib).loss
        assert abs(float(scores[i]) - float(loss)) < 1e-4


def test_bi_matches_hidden_states(calib):
    model = tiny_model("mistral")
    scores = bi_scores(get_adapter(model), calib, batch_size=2)
    with torch.no_grad():
        hs = model(calib, output_hidden_states=True).hidden_states
    # hidden_states[i] enters block i; the last entry is after the final norm, so compare blocks 0..L-2
    for i in range(len(hs) - 2):
        want = 1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean()
        assert abs(float(scores[i]) - float(want)) < 1e-5


def test_lowest_and_candidates():
    s = torch.tensor([0.5, float("nan"), 0.1, 0.1, 0.9])
    assert lowest(s, 2) == [2, 3]
    with pytest.raises(ValueError):
        lowest(s, 5)
    assert candidate_blocks(6, 1, 1) == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        candidate_blocks(2, 1, 1)
