"""Batched generation: Engine.generate of a list of prompts runs up to MAX_BATCH of them together
(one decode step over all, each weight read once) and must give what each prompt gives alone
(single-sequence decode is checked against transformers elsewhere): token for token, greedy, in
float32, dense and under each sequence's own sparse mask, with more prompts than one batch holds."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODELS
from tda_engine import MAX_BATCH, Sparsity
from test_gating import GATE_MODELS, gated_spec
from test_sparsity import sref

# Batched products sum in another order than one row's: float32 log-probs agree to about 1e-5.
LOGPROB_TOL = 1e-4


def prompts(eng, count: int) -> list[list[int]]:
    """`count` prompts of 3-17 in-vocabulary tokens, all different."""
    v = eng.model_info["vocab_size"]
    rng = np.random.default_rng(7)
    return [rng.integers(1, v, size=3 + (5 * i) % 15).tolist() for i in range(count)]


def check(eng, ps, n=8, **kw):
    kw = dict(max_new_tokens=n, temperature=0, ignore_eos=True, logprobs=True, **kw)
    together = eng.generate(ps, **kw)
    assert isinstance(together, list) and len(together) == len(ps)
    for p, got in zip(ps, together, strict=True):
        alone = eng.generate(p, **kw)
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text and got.finish_reason == alone.finish_reason
        assert got.usage == alone.usage and got.usage.prompt_tokens == len(p)
        np.testing.assert_allclose(got.logprobs, alone.logprobs, atol=LOGPROB_TOL, rtol=0)
        assert got.ffn_active == alone.ffn_active
        assert got.ffn_bytes == pytest.approx(alone.ffn_bytes, abs=1e-9)
    return together


@pytest.mark.parametrize("name", MODELS)
def test_batched_dense_equals_each_alone(engine_for, name):
    eng = engine_for(name)
    check(eng, prompts(eng, MAX_BATCH))


@pytest.mark.parametrize("name", GATE_MODELS[:2])
def test_batched_sparse_each_under_its_own_mask(engine_for, name):
    eng = engine_for(name)
    ps = prompts(eng, MAX_BATCH)
    tda = Sparsity.tda(thresholds=sref(name)["tda_thresholds"].tolist())
    out = check(eng, ps, sparsity=tda)
    # the masks come from each prompt: they differ between sequences
    assert len({tuple(r.ffn_active) for r in out}) > 1
    check(eng, ps, sparsity=gated_spec(name, "cats"))
    check(eng, ps, sparsity=gated_spec(name, "hybrid"))


def test_more_prompts_than_a_batch_and_uneven_lengths(engine_for):
    eng = engine_for(MODELS[0])
    ps = prompts(eng, MAX_BATCH + 3)
    # the first MAX_BATCH run together; as they finish, the rest join
    check(eng, ps, n=5)
    check(eng, ps[:3], n=1)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([], max_new_tokens=3)


def test_a_bad_prompt_fails_before_anything_runs(engine_for):
    eng = engine_for(MODELS[0])
    v = eng.model_info["vocab_size"]
    ps = prompts(eng, 3)
    with pytest.raises(ValueError, match=str(v + 5)):
        eng.generate([*ps, [1, v + 5]], max_new_tokens=2)
    # the engine stays usable
    check(eng, ps, n=2)
