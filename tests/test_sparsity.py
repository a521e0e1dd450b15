"""Sparse FFN decoding: TDA and GRIFFIN masks against a numpy reference of the definitions and
against transformers (tests/fixtures/make_sparsity_refs.py), sparse decoding against a dense
forward with the skipped activations zeroed, calibration, scoring, and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import MODELS, greedy, log_softmax, model_dir
from tda_engine import Sparsity, Thresholds

SPARSE_MODELS = [m for m in MODELS if (model_dir(m) / "sparsity.npz").exists()]
CORPUS = """The river rose through the night, and by morning the low fields were under water.
Farmers moved their animals to the ridge while the radio repeated the warnings. In the town, the
bakery opened anyway, because people needed bread and somewhere warm to stand. A child asked why
the water was brown, and her grandfather explained that it carried the soil of a hundred farms
upstream. By noon the rain stopped. The sky cleared from the west, and the river began, very
slowly, to fall. Engineers walked the levee with clipboards, measuring, writing, and talking to
each other in low voices about pumps and sandbags and the next storm."""


def sref(name):
    with np.load(model_dir(name) / "sparsity.npz") as z:
        return {k: z[k] for k in z.files}


def numpy_tda_scores(act: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(act.astype(np.float64) ** 2, axis=0))


def numpy_griffin_scores(act: np.ndarray) -> np.ndarray:
    a = act.astype(np.float64)
    z = a / np.linalg.norm(a, axis=1, keepdims=True)
    return np.linalg.norm(z, axis=0)


def numpy_griffin_keep(scores: np.ndarray, density: float) -> np.ndarray:
    k = max(1, math.floor(density * len(scores)))
    keep = np.zeros(len(scores), bool)
    keep[np.argsort(-scores, kind="stable")[:k]] = True
    return keep


def layer_acts(r):
    return [r[f"act_{i}"] for i in range(len(r["tda_thresholds"]))]


@pytest.fixture(params=SPARSE_MODELS)
def smodel(request):
    return request.param


# -- masks against the definitions -----------------------------------------------------------


def test_scores_match_numpy_reference_of_definitions(smodel, engine_for):
    r = sref(smodel)
    eng = engine_for(smodel)
    p = int(r["prefix_len"])
    got = eng.neuron_scores(r["ids"][:p].tolist())
    for li, act in enumerate(layer_acts(r)):
        np.testing.assert_allclose(got["tda"][li], numpy_tda_scores(act), rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(got["griffin"][li], numpy_griffin_scores(act), rtol=2e-4, atol=1e-6)
        # the stored scores are the same definitions, computed by the fixture script
        np.testing.assert_allclose(r["tda_scores"][li], numpy_tda_scores(act), rtol=1e-5)


def test_masks_match_numpy_reference(smodel, engine_for):
    r = sref(smodel)
    eng = engine_for(smodel)
    p = int(r["prefix_len"])
    prompt = r["ids"][:p].tolist()
    acts = layer_acts(r)
    taus = r["tda_thresholds"].tolist()
    tda = eng.select_neurons(prompt, Sparsity.tda(thresholds=taus))
    gri = eng.select_neurons(prompt, Sparsity.griffin(0.5))
    for li, act in enumerate(acts):
        want_tda = np.flatnonzero(numpy_tda_scores(act) >= taus[li])
        np.testing.assert_array_equal(tda[li], want_tda)
        np.testing.assert_array_equal(tda[li], np.flatnonzero(r["tda_keep"][li]))
        want_gri = np.flatnonzero(numpy_griffin_keep(numpy_griffin_scores(act), 0.5))
        np.testing.assert_array_equal(gri[li], want_gri)
        np.testing.assert_array_equal(gri[li], np.flatnonzero(r["griffin_keep"][li]))
    # other densities, against the numpy reference alone
    for d in (0.1, 0.33, 0.9):
        got = eng.select_neurons(prompt, Sparsity.griffin(d))
        for li, act in enumerate(acts):
            s = numpy_griffin_scores(act)
            k = max(1, math.floor(d * len(s)))
            assert len(got[li]) == k
            # every kept score is >= every skipped score (up to float32 rounding)
            skipped = np.setdiff1d(np.arange(len(s)), got[li])
            if len(skipped):
                assert s[got[li]].min() >= s[skipped].max() - 1e-5


def test_score_matches_transformers_masked_forward(smodel, engine_for):
    """score() equals HF's forward with the skipped neurons' activations zeroed after the prefix."""
    r = sref(smodel)
    eng = engine_for(smodel)
    ids, p = r["ids"].tolist(), int(r["prefix_len"])
    specs = [Sparsity.dense(), Sparsity.tda(thresholds=r["tda_thresholds"].tolist()), Sparsity.griffin(0.5)]
    got = eng.score_many(ids, p, specs)
    for (lp, _), key in zip(got, ["logits_dense", "logits_tda", "logits_griffin"], strict=False):
        ref = log_softmax(r[key])[p - 1 : -1][np.arange(len(ids) - p), ids[p:]]
        np.testing.assert_allclose(lp, ref, atol=2e-4, err_msg=f"{smodel} {key}")
    # the masks matter: sparse log-probs differ from dense after the first scored token
    assert np.abs(got[1][0][1:] - got[0][0][1:]).max() > 1e-3
    assert got[1][0][0] == got[0][0][0]


# -- sparse decoding -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["tda", "griffin:0.5", "griffin:0.25"])
def test_sparse_decode_equals_forward_with_zeroed_activations(smodel, engine_for, spec):
    r = sref(smodel)
    eng = engine_for(smodel)
    p = int(r["prefix_len"])
    prompt = r["ids"][:p].tolist()
    sp = Sparsity.tda(thresholds=r["tda_thresholds"].tolist()) if spec == "tda" else Sparsity.parse(spec)
    out = greedy(eng, prompt, 12, logprobs=True, sparsity=sp)
    lp = eng.score(prompt + out.token_ids, p, sp)
    np.testing.assert_allclose(out.logprobs, lp, atol=2e-4)
    # and it really is sparse: the dense run differs somewhere
    dense = greedy(eng, prompt, 12, logprobs=True)
    assert dense.logprobs[0] == out.logprobs[0]  # the first token comes from the dense prefill
    assert dense.token_ids != out.token_ids or np.abs(np.subtract(dense.logprobs, out.logprobs)).max() > 1e-4


def test_all_kept_equals_dense_exactly(smodel, engine_for):
    eng = engine_for(smodel)
    r = sref(smodel)
    prompt = r["ids"][: int(r["prefix_len"])].tolist()
    n = eng.model_info["intermediate_size"]
    dense = greedy(eng, prompt, 16, logprobs=True)
    for sp in (Sparsity.tda(thresholds=0.0), Sparsity.griffin(1.0), Sparsity.dense(), None):
        out = greedy(eng, prompt, 16, logprobs=True, sparsity=sp)
        assert out.token_ids == dense.token_ids
        assert out.logprobs == dense.logprobs  # exactly
        assert out.ffn_active == [n] * eng.model_info["num_layers"]
    ids = prompt + dense.token_ids
    a, b, c = eng.score_many(ids, 10, [None, Sparsity.tda(thresholds=0.0), Sparsity.griffin(1.0)])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], c[0])


def test_kept_counts_reported(smodel, engine_for):
    eng = engine_for(smodel)
    r = sref(smodel)
    prompt = r["ids"][: int(r["prefix_len"])].tolist()
    n = eng.model_info["intermediate_size"]
    taus = r["tda_thresholds"].tolist()
    out = greedy(eng, prompt, 4, sparsity=Sparsity.tda(thresholds=taus))
    assert out.ffn_active == r["tda_keep"].sum(axis=1).tolist()
    out = greedy(eng, prompt, 4, sparsity="griffin:0.3")
    assert out.ffn_active == [math.floor(0.3 * n)] * len(taus)
    _, active = eng.score_many(r["ids"].tolist(), len(prompt), [Sparsity.tda(thresholds=taus)])[0]
    assert active == out.ffn_active or active == r["tda_keep"].sum(axis=1).tolist()
    assert greedy(eng, prompt, 4).ffn_active == [n] * len(taus)


def test_stream_and_chat_accept_sparsity(engine_for):
    name = SPARSE_MODELS[0]
    eng = engine_for(name)
    r = sref(name)
    prompt = r["ids"][: int(r["prefix_len"])].tolist()
    sp = Sparsity.griffin(0.5)
    full = greedy(eng, prompt, 10, sparsity=sp)
    s = eng.stream(prompt, max_new_tokens=10, temperature=0, ignore_eos=True, sparsity=sp)
    text = "".join(s)
    assert text == full.text and s.result.token_ids == full.token_ids
    assert s.result.ffn_active == full.ffn_active


def test_score_dense_is_log_softmax_of_forward(engine_for):
    for name in SPARSE_MODELS[:3]:
        eng = engine_for(name)
        ids = sref(name)["ids"].tolist()
        lg = log_softmax(eng.forward(ids))
        for p in (1, 7, len(ids) - 1):
            want = lg[p - 1 : -1][np.arange(len(ids) - p), ids[p:]]
            np.testing.assert_allclose(eng.score(ids, p), want, atol=2e-5)


# -- thresholds, calibration -----------------------------------------------------------------


def test_thresholds_interpolate_in_log_length_and_round_trip(tmp_path):
    th = Thresholds([[1.0, 2.0], [3.0, 4.0]], prompt_lengths=[16, 64], meta={"x": 1})
    assert th.at(8) == [1.0, 2.0] and th.at(100) == [3.0, 4.0]
    assert th.at(32) == pytest.approx([2.0, 3.0])
    th.save(tmp_path / "t.json")
    back = Thresholds.load(tmp_path / "t.json")
    assert back.values == th.values and back.prompt_lengths == th.prompt_lengths and back.meta == th.meta
    assert Sparsity.tda(thresholds=tmp_path / "t.json").thresholds.values == th.values


def test_length_dependent_thresholds_are_applied(smodel, engine_for):
    """A prompt of S tokens uses the thresholds interpolated at S."""
    eng = engine_for(smodel)
    r = sref(smodel)
    prompt = r["ids"][: int(r["prefix_len"])].tolist()
    L = eng.model_info["num_layers"]
    scores = eng.neuron_scores(prompt)["tda"]
    lo = [float(np.quantile(s, 0.2)) for s in scores]
    hi = [float(np.quantile(s, 0.8)) for s in scores]
    th = Thresholds([lo, hi], prompt_lengths=[len(prompt) // 2, len(prompt) * 2])
    taus = th.at(len(prompt))
    got = eng.select_neurons(prompt, Sparsity.tda(thresholds=th))
    for li in range(L):
        np.testing.assert_array_equal(got[li], np.flatnonzero(scores[li] >= taus[li]))


def test_calibrated_thresholds_are_pooled_quantiles(engine_for):
    """calibrate(density=d) with one length: per layer, a fraction d of the pooled scores of the
    calibration windows is at or above the threshold."""
    name = SPARSE_MODELS[0]
    eng = engine_for(name)
    length, nwin = 48, 6
    for d in (0.3, 0.5, 0.8):
        th = eng.calibrate(CORPUS * 4, density=d, lengths=[length], max_windows=nwin)
        assert th.prompt_lengths == [] and th.num_layers == eng.model_info["num_layers"]
        assert th.meta["density"] == d
        bos = eng.tokenize("Hello")[: len(eng.tokenize("Hello")) - len(eng.tokenize("Hello", False))]
        ids = eng.tokenize(CORPUS * 4, add_special_tokens=False)
        body = length - len(bos)
        wins = [bos + ids[i : i + body] for i in range(0, len(ids) - body + 1, body)][:nwin]
        assert len(wins) == nwin
        pooled = [np.concatenate(x) for x in zip(*[eng.neuron_scores(w)["tda"] for w in wins], strict=False)]
        for li, s in enumerate(pooled):
            frac = np.mean(s >= th.values[0][li])
            assert abs(frac - d) <= 2.0 / len(s) + 1e-9, (d, li, frac)


def test_calibrate_length_grid_and_density_default(engine_for, tmp_path):
    name = SPARSE_MODELS[0]
    eng = engine_for(name)
    th = eng.calibrate(CORPUS * 4, density=0.5)
    assert th.prompt_lengths and th.prompt_lengths[0] == 16
    assert len(th.values) == len(th.prompt_lengths)
    th.save(tmp_path / "th.json")
    doc = json.loads((tmp_path / "th.json").read_text())
    assert doc["format"] == "tda-engine-thresholds" and doc["num_layers"] == eng.model_info["num_layers"]
    out = greedy(eng, eng.tokenize(CORPUS)[:30], 4, sparsity=Sparsity.tda(thresholds=tmp_path / "th.json"))
    assert len(out.token_ids) == 4
    # Sparsity.tda(density=...) uses the engine's own calibration on the built-in corpus.
    dflt = eng.default_thresholds(0.5)
    assert dflt.meta["text"] == "default corpus" and dflt.prompt_lengths
    out = greedy(eng, eng.tokenize(CORPUS)[:30], 4, sparsity=Sparsity.tda(density=0.5))
    n = eng.model_info["intermediate_size"]
    assert all(0 < k < n for k in out.ffn_active)


def test_quality_budget_calibration(engine_for):
    name = SPARSE_MODELS[0]
    eng = engine_for(name)
    th = eng.calibrate(CORPUS * 12, max_ppl_increase=0.05)
    rep = th.report
    assert rep is not None and rep["ppl"] <= rep["ppl_dense"] * 1.05 + 1e-9
    assert len(rep["layer_densities"]) == eng.model_info["num_layers"]
    assert all(0 < d <= 1 for d in rep["layer_densities"])
    assert th.meta["calibration"] == "max_ppl_increase" and th.meta["layer_densities"] == rep["layer_densities"]
    # a looser budget never keeps more
    loose = eng.calibrate(CORPUS * 12, max_ppl_increase=5.0)
    assert loose.report["kept_fraction"] <= rep["kept_fraction"] + 1e-9
    assert loose.report["kept_fraction"] < 1.0


def test_calibration_reports_progress_and_stops_cleanly(engine_for):
    import signal

    name = SPARSE_MODELS[0]
    eng = engine_for(name)
    plain = {}
    for kw in ({"density": 0.5}, {"max_ppl_increase": 0.5}):
        calls = []
        th = eng.calibrate(CORPUS * 12, progress=lambda done, total, calls=calls: calls.append((done, total)), **kw)
        totals = {t for _, t in calls}
        assert len(totals) == 1, f"{kw}: the total changed: {sorted(totals)}"
        total = totals.pop()
        # One call before each step and one at the end: 0, 1, ..., total.
        assert [d for d, _ in calls] == list(range(total + 1)), kw
        plain[next(iter(kw))] = eng.calibrate(CORPUS * 12, **kw).values
        assert th.values == plain[next(iter(kw))], f"{kw}: progress changed the result"

    # What the callback raises stops the calibration and propagates; the engine stays usable.
    class Stop(Exception):
        pass

    def stop_at(n, exc):
        def cb(done, total):
            if done == n:
                raise exc

        return cb

    with pytest.raises(Stop):
        eng.calibrate(CORPUS * 12, max_ppl_increase=0.5, progress=stop_at(2, Stop()))
    with pytest.raises(KeyboardInterrupt):
        eng.calibrate_densities(CORPUS * 12, [0.5], progress=stop_at(1, KeyboardInterrupt()))

    # Ctrl-C: SIGINT while calibrating (no callback needed) stops it with KeyboardInterrupt.
    def sigint(done, total):
        if done == 1:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        eng.calibrate(CORPUS * 12, density=0.5, progress=sigint)
    ids = sref(name)["ids"][:10].tolist()
    assert len(eng.generate(ids, max_new_tokens=3).token_ids) == 3
    assert eng.calibrate(CORPUS * 12, density=0.5).values == plain["density"]
    with pytest.raises(TypeError, match="progress must be a callable"):
        eng.calibrate(CORPUS, density=0.5, progress=3)


# -- bad input -------------------------------------------------------------------------------


def test_bad_sparsity_inputs(engine_for):
    name = SPARSE_MODELS[0]
    eng = engine_for(name)
    L = eng.model_info["num_layers"]
    prompt = sref(name)["ids"][:10].tolist()
    with pytest.raises(ValueError, match=f"{L + 1} values.*{L} layers"):
        eng.generate(prompt, max_new_tokens=2, sparsity=Sparsity.tda(thresholds=[0.1] * (L + 1)))
    with pytest.raises(ValueError, match="nan"):
        Sparsity.tda(thresholds=[float("nan")] * L)
    with pytest.raises(ValueError, match="inf"):
        Sparsity.tda(thresholds=float("inf"))
    with pytest.raises(ValueError, match="-1"):
        Sparsity.tda(thresholds=[-1.0] * L)
    for d in (0, 0.0, -0.5, 1.5, float("nan")):
        for make in (Sparsity.griffin, lambda x: Sparsity.tda(density=x)):
            with pytest.raises(ValueError, match="density must be in"):
                make(d)
        with pytest.raises(ValueError, match="density must be in"):
            eng.calibrate(CORPUS, density=d)
    with pytest.raises(TypeError, match="density"):
        Sparsity.griffin("half")
    for bad in ("foo:0.5", "tda", "griffin", "dense:3", "griffin:x"):
        with pytest.raises(ValueError):
            eng.generate(prompt, max_new_tokens=2, sparsity=bad)
    with pytest.raises(TypeError, match="sparsity"):
        eng.generate(prompt, max_new_tokens=2, sparsity=0.5)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Sparsity.tda(thresholds="nope.json")
    with pytest.raises(ValueError, match="exactly one"):
        Sparsity.tda(thresholds=0.1, density=0.5)
    with pytest.raises(ValueError, match="takes one of"):
        eng.calibrate(CORPUS, density=0.5, max_ppl_increase=0.1)
    with pytest.raises(ValueError, match="max_ppl_increase"):
        eng.calibrate(CORPUS, max_ppl_increase=-1)
    with pytest.raises(ValueError, match="prefix_len"):
        eng.score(prompt, len(prompt))
    with pytest.raises(ValueError, match="prefix_len"):
        eng.score(prompt, 0)
    with pytest.raises(ValueError, match="too short"):
        eng.calibrate("a b", density=0.5)
    # the engine is still fine
    out = greedy(eng, prompt, 4, sparsity="griffin:0.5")
    assert len(out.token_ids) == 4


def test_bad_thresholds_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Sparsity.tda(thresholds=p)
    p.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a tda-engine thresholds file"):
        Sparsity.tda(thresholds=p)


def test_default_calibration_is_cached_on_disk(engine_for, tmp_path, monkeypatch):
    monkeypatch.setenv("TDA_ENGINE_CACHE", str(tmp_path))
    name = SPARSE_MODELS[0]
    eng = engine_for(name)
    prompt = sref(name)["ids"][:12].tolist()
    out = greedy(eng, prompt, 3, sparsity="tda:0.4")
    files = list((tmp_path / "calibration").glob("*.json"))
    assert len(files) == 1
    cached = Thresholds.load(files[0])
    assert cached.values == eng.default_thresholds(0.4).values
    # a damaged entry is rebuilt, not an error
    files[0].write_text("garbage")
    assert greedy(eng, prompt, 3, sparsity="tda:0.4").token_ids == out.token_ids
    assert Thresholds.load(files[0]).values == cached.values


def test_sparse_generation_from_several_threads(engine_for):
    """Each concurrent generation keeps its own mask: results equal the sequential ones."""
    from concurrent.futures import ThreadPoolExecutor

    name = SPARSE_MODELS[0]
    eng = engine_for(name)
    ids = sref(name)["ids"].tolist()
    jobs = [(ids[: 10 + i], spec) for i in range(4) for spec in (None, "griffin:0.3", "tda:0.5", "griffin:0.7")]
    want = [greedy(eng, p, 8, sparsity=s) for p, s in jobs]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda j: greedy(eng, j[0], 8, sparsity=j[1]), jobs))
    for w, g in zip(want, got, strict=True):
        assert w.token_ids == g.token_ids and w.ffn_active == g.ffn_active


def test_bos_prefix_is_what_the_tokenizer_prepends(engine_for):
    for name in SPARSE_MODELS:
        eng = engine_for(name)
        with_sp, without = eng.tokenize("Hello"), eng.tokenize("Hello", add_special_tokens=False)
        assert with_sp == eng.bos_prefix() + without[: len(with_sp) - len(eng.bos_prefix())]
