"""Per-token gating (CATS, hybrid): score() against transformers with exactly the gated activations
zeroed (tests/fixtures/make_gating_refs.py), the delivered FFN bytes against a count of the
reference's passing sets, sparse decoding against score(), keep=1 against dense, calibration of the
gate thresholds and of both knobs under a budget, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import MODELS, greedy, log_softmax, model_dir
from tda_engine import Sparsity, Thresholds
from test_sparsity import CORPUS, sref

GATE_MODELS = [m for m in MODELS if (model_dir(m) / "gating.npz").exists()]
METHODS = ("cats", "hybrid")


def gref(name):
    with np.load(model_dir(name) / "gating.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(params=GATE_MODELS)
def gmodel(request):
    return request.param


def gated_spec(name: str, method: str) -> Sparsity:
    """The fixture's thresholds: for CATS every neuron in the superset, for the hybrid TDA's."""
    r, g = sref(name), gref(name)
    layers = len(r["tda_thresholds"])
    values = [0.0] * layers if method == "cats" else r["tda_thresholds"].tolist()
    return Sparsity.tda(thresholds=Thresholds(values, gate=g[f"{method}_thresholds"].tolist()))


def expected_ffn_bytes(r, g, method: str) -> float:
    """The FFN bytes a decoded token reads, counted from the reference's passing sets: per layer the
    gate rows of the superset and the up and down rows of the passing neurons, over the dense
    bytes (the fixtures are float32: every row has the same size). The scored continuation runs the
    positions prefix_len .. S-2 (the last token is only a target)."""
    keep = np.ones_like(r["tda_keep"]) if method == "cats" else r["tda_keep"]
    passing = g[f"{method}_pass"][:, :-1, :]
    layers, _, n = passing.shape
    per_layer = keep.sum(axis=1) + 2 * passing.sum(axis=2).mean(axis=1)
    return float(per_layer.sum() / (3 * n * layers))


# -- against transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_score_matches_transformers_gated_forward_and_counts_bytes(gmodel, engine_for, method):
    r, g = sref(gmodel), gref(gmodel)
    eng = engine_for(gmodel)
    ids, p = r["ids"].tolist(), int(r["prefix_len"])
    spec = gated_spec(gmodel, method)
    (lp, kept, nbytes), (dense_lp, _, dense_bytes) = eng.score_many(ids, p, [spec, None], return_ffn_bytes=True)
    ref = log_softmax(g[f"logits_{method}"])[p - 1 : -1][np.arange(len(ids) - p), ids[p:]]
    np.testing.assert_allclose(lp, ref, atol=2e-4, err_msg=f"{gmodel} {method}")
    # the gate matters, and the first scored token comes from the dense prefix
    assert np.abs(lp[1:] - dense_lp[1:]).max() > 1e-3
    assert lp[0] == dense_lp[0]
    # the superset is the prompt's TDA set (all neurons for CATS)
    want_kept = r["tda_keep"].sum(axis=1) if method == "hybrid" else [eng.model_info["intermediate_size"]] * len(kept)
    assert kept == list(want_kept)
    # the bytes the kernels counted are the reference's passing sets, exactly
    assert nbytes == pytest.approx(expected_ffn_bytes(r, g, method), rel=1e-9)
    assert dense_bytes == 1.0
    assert eng.score(ids, p, spec, return_ffn_bytes=True)[1] == nbytes


@pytest.mark.parametrize("method", METHODS)
def test_gated_decode_equals_score_of_the_same_tokens(gmodel, engine_for, method):
    r = sref(gmodel)
    eng = engine_for(gmodel)
    p = int(r["prefix_len"])
    prompt = r["ids"][:p].tolist()
    spec = gated_spec(gmodel, method)
    out = greedy(eng, prompt, 12, logprobs=True, sparsity=spec)
    lp, nbytes = eng.score(prompt + out.token_ids, p, spec, return_ffn_bytes=True)
    np.testing.assert_allclose(out.logprobs, lp, atol=2e-4)
    # decoding counts the same rows as scoring (a gate value at the threshold may flip in one)
    assert out.ffn_bytes == pytest.approx(nbytes, abs=2e-3)
    assert 0.3 < out.ffn_bytes < 0.95
    dense = greedy(eng, prompt, 12, logprobs=True)
    assert dense.logprobs[0] == out.logprobs[0]
    assert dense.token_ids != out.token_ids or np.abs(np.subtract(dense.logprobs, out.logprobs)).max() > 1e-4
    # streaming runs the same decode
    s = eng.stream(prompt, max_new_tokens=12, temperature=0.0, ignore_eos=True, sparsity=spec)
    "".join(s)
    assert s.result.token_ids == out.token_ids and s.result.ffn_bytes == out.ffn_bytes


def test_keep_one_equals_dense_exactly(gmodel, engine_for):
    r = sref(gmodel)
    eng = engine_for(gmodel)
    L = eng.model_info["num_layers"]
    prompt = r["ids"][: int(r["prefix_len"])].tolist()
    dense = greedy(eng, prompt, 16, logprobs=True)
    ids = prompt + dense.token_ids
    dense_lp = eng.score(ids, 10)
    for sp in (
        Sparsity.cats(1.0),
        Sparsity.hybrid(1.0, 1.0),
        "cats:1",
        Sparsity.tda(thresholds=Thresholds([0.0] * L, gate=[0.0] * L)),
    ):
        out = greedy(eng, prompt, 16, logprobs=True, sparsity=sp)
        assert out.token_ids == dense.token_ids and out.logprobs == dense.logprobs, sp  # exactly
        assert out.ffn_bytes == 1.0
        lp, nbytes = eng.score(ids, 10, sp, return_ffn_bytes=True)
        np.testing.assert_array_equal(lp, dense_lp)
        assert nbytes == 1.0


# -- the default calibration and gate calibration ------------------------------------------------


def test_cats_and_hybrid_take_thresholds_from_the_default_corpus(engine_for):
    name = GATE_MODELS[0]
    eng = engine_for(name)
    L = eng.model_info["num_layers"]
    cats = eng.resolved_thresholds("cats:0.5")
    assert cats.values == [[0.0] * L] and len(cats.gate) == L and all(t > 0 for t in cats.gate)
    assert cats.meta["method"] == "cats" and cats.meta["keep"] == 0.5
    hyb = eng.resolved_thresholds(Sparsity.hybrid(0.8, 0.5))
    assert hyb.values == eng.default_thresholds(0.8).values and all(t > 0 for t in hyb.gate)
    # a larger keep fraction lowers every threshold
    assert all(a < b for a, b in zip(eng.resolved_thresholds("cats:0.8").gate, cats.gate, strict=True))
    prompt = sref(name)["ids"][:20].tolist()
    for spec, lo, hi in (("cats:0.5", 0.5, 0.85), ("hybrid:0.8,0.5", 0.35, 0.75)):
        out = greedy(eng, prompt, 16, sparsity=spec)
        assert lo < out.ffn_bytes < hi, (spec, out.ffn_bytes)


def test_gate_calibration_passes_the_asked_fraction_on_held_out_text(engine_for):
    name = GATE_MODELS[0]
    eng = engine_for(name)
    n, L = eng.model_info["intermediate_size"], eng.model_info["num_layers"]
    text = CORPUS * 12
    held = eng.tokenize(" ".join(reversed(CORPUS.split())) * 3, add_special_tokens=False)[:160]
    ids = eng.bos_prefix() + held
    p = 64
    for keep in (0.7, 0.4):
        th = eng.calibrate(text, keep=keep)
        assert th.meta["method"] == "cats" and len(th.gate) == L
        _, nbytes = eng.score(ids, p, Sparsity.tda(thresholds=th), return_ffn_bytes=True)
        passed = (nbytes - 1 / 3) / (2 / 3)  # CATS: every gate row, the passing up and down rows
        assert abs(passed - keep) < 0.1, (keep, passed)
    th = eng.calibrate(text, density=0.8, keep=0.5)
    assert th.meta["method"] == "hybrid"
    kept = sum(len(k) for k in eng.select_neurons(ids[:p], Sparsity.tda(thresholds=th)))
    _, nbytes = eng.score(ids, p, Sparsity.tda(thresholds=th), return_ffn_bytes=True)
    passed = (nbytes * 3 * n * L - kept) / 2 / kept
    assert abs(passed - 0.5) < 0.12, passed
    # one pass over the text for several pairs gives the same thresholds
    many = eng.calibrate_gates(text, [(1.0, 0.7), (0.8, 0.5)])
    assert many[0].gate == eng.calibrate(text, keep=0.7).gate and many[1].gate == th.gate


def test_budget_calibration_over_both_knobs(engine_for, tmp_path):
    name = GATE_MODELS[0]
    eng = engine_for(name)
    L = eng.model_info["num_layers"]
    text = CORPUS * 12
    th = eng.calibrate(text, ffn_bytes=0.7)
    rep = th.report
    assert rep["ffn_bytes"] <= 0.7 and rep["ffn_bytes_budget"] == 0.7
    assert len(rep["layer_densities"]) == L and len(rep["layer_keeps"]) == L
    assert rep["ppl"] >= rep["ppl_dense"] * 0.9
    # it saves, loads, and runs as sparsity=
    th.save(tmp_path / "b.json")
    back = Thresholds.load(tmp_path / "b.json")
    assert back.gate == th.gate and back.values == th.values
    prompt = sref(name)["ids"][:20].tolist()
    out = greedy(eng, prompt, 8, sparsity=Sparsity.tda(thresholds=back))
    assert out.ffn_bytes < 0.95
    # a perplexity budget: within it on the held-out windows, and a looser one never reads more
    tight = eng.calibrate(text, max_ppl_increase=0.02)
    assert tight.report["ppl"] <= tight.report["ppl_dense"] * 1.02 + 1e-9
    loose = eng.calibrate(text, max_ppl_increase=1.0)
    assert loose.report["ffn_bytes"] <= tight.report["ffn_bytes"] + 1e-9 and loose.report["ffn_bytes"] < 0.9
    # restricted to TDA, no layer gates; restricted to CATS, every superset is whole
    tda = eng.calibrate(text, max_ppl_increase=1.0, method="tda")
    assert tda.gate == [] and all(k == 1.0 for k in tda.report["layer_keeps"])
    cats = eng.calibrate(text, max_ppl_increase=1.0, method="cats")
    assert all(d == 1.0 for d in cats.report["layer_densities"])
    # the floor: never worse than the best one-setting-for-all-layers plan the search measured,
    # and that plan is one of the methods allowed
    for r in (rep, tight.report, loose.report, tda.report, cats.report):
        u, p = r.get("uniform"), r.get("per_layer")
        assert r["chosen"] in ("uniform", "per-layer")
        best = u if r["chosen"] == "uniform" else p
        if best is not None:
            assert (r["ppl"], r["ffn_bytes"]) == (best["ppl"], best["ffn_bytes"])
        if u is not None and "ffn_bytes_budget" in r:
            assert u["ffn_bytes"] <= r["ffn_bytes_budget"] and r["ppl"] <= u["ppl"]
        elif u is not None:
            assert u["ppl"] <= r["ppl_dense"] * (1 + r["max_ppl_increase"]) + 1e-9
            assert r["ffn_bytes"] <= u["ffn_bytes"]
    assert tda.report.get("uniform") is None or tda.report["uniform"]["setting"].startswith("tda:")
    assert cats.report.get("uniform") is None or cats.report["uniform"]["setting"].startswith("cats:")


# -- bad input ------------------------------------------------------------------------------------


def test_bad_gating_inputs(engine_for, tmp_path):
    name = GATE_MODELS[0]
    eng = engine_for(name)
    L = eng.model_info["num_layers"]
    prompt = sref(name)["ids"][:10].tolist()
    for bad in (0, 1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match="keep must be in"):
            Sparsity.cats(bad)
        with pytest.raises(ValueError, match="keep must be in"):
            Sparsity.hybrid(0.9, bad)
    with pytest.raises(TypeError, match="keep must be a number"):
        Sparsity.cats("0.5")
    with pytest.raises(ValueError, match="density must be in"):
        Sparsity.hybrid(0.0, 0.5)
    for bad in ("cats:0", "cats:2", "hybrid:0.9", "hybrid:0.9,0.5,0.1", "hybrid:a,b", "cats:x"):
        with pytest.raises(ValueError):
            Sparsity.parse(bad)
    with pytest.raises(ValueError, match="unknown sparsity"):
        Sparsity.parse("gated:0.5")
    with pytest.raises(ValueError, match="gate thresholds for"):
        Thresholds([0.1] * L, gate=[0.1] * (L + 1))
    with pytest.raises(ValueError, match="gate"):
        Thresholds([0.1] * L, gate=[math.nan] * L)
    with pytest.raises(ValueError, match="gate"):
        Thresholds([0.1] * L, gate=[-1.0] * L)
    # a file whose gate does not fit the model
    doc = Thresholds([0.1] * (L + 1), gate=[0.1] * (L + 1))
    doc.save(tmp_path / "x.json")
    with pytest.raises(ValueError, match=f"{L} layers"):
        eng.generate(prompt, max_new_tokens=2, sparsity=f"tda:{tmp_path / 'x.json'}")
    with pytest.raises(ValueError, match="keep must be in"):
        eng.calibrate(CORPUS, keep=1.5)
    with pytest.raises(ValueError, match="ffn_bytes must be in"):
        eng.calibrate(CORPUS, ffn_bytes=0.0)
    with pytest.raises(ValueError, match="method must be"):
        eng.calibrate(CORPUS, max_ppl_increase=0.1, method="bogus")
    with pytest.raises(ValueError, match="takes one of"):
        eng.calibrate(CORPUS, ffn_bytes=0.5, max_ppl_increase=0.1)
    with pytest.raises(TypeError, match="return_ffn_bytes"):
        eng.score(prompt, 5, "cats:0.5", return_ffn_bytes=1)
    # the engine is still usable
    assert len(greedy(eng, prompt, 3, sparsity="cats:0.5").token_ids) == 3
