"""Generation semantics: cached decode, sampling, stopping, streaming, batching, defaults."""

from __future__ import annotations

import gc
import json
import math
import threading

import numpy as np
import pytest
from conftest import MODELS, SLIDING_MODELS, greedy, log_softmax, ref_for

N_GREEDY = 24


def _forward_lsm(engine, ids):
    full = engine.forward(list(ids))
    assert full.shape[0] == len(ids)
    return full, log_softmax(full)


def _sliding_window(ref):
    tc = ref.text_config()
    w = tc.get("sliding_window")
    return int(w) if w else None


# --------------------------------------------------------------------------- cached decode == full forward


@pytest.mark.parametrize("prompt_kind", ["reference", "short"])
def test_cached_decode_matches_full_forward(model, engine, prompt_kind):
    """Greedy decoding with the KV cache equals recomputing everything with a full forward pass.

    "short" starts from 3 prompt tokens, so that decoding itself (not only the prefill) crosses the
    sliding window of mistral / gemma2 / gemma3.
    """
    ref = ref_for(model)
    prompt = ref.prompt_ids if prompt_kind == "reference" else ref.prompt_ids[:3]
    n = 32
    assert len(prompt) + n < ref.max_position_embeddings
    window = _sliding_window(ref)
    if model in SLIDING_MODELS:
        assert window is not None, f"{model} should have a sliding window"
        assert len(prompt) + n > 2 * window, "the test must decode past the sliding window"
    out = greedy(engine, prompt, n, logprobs=True)
    assert len(out.token_ids) == n
    assert out.logprobs is not None and len(out.logprobs) == n
    full, lsm = _forward_lsm(engine, prompt + out.token_ids)
    p = len(prompt)
    for i, tok in enumerate(out.token_ids):
        row = full[p - 1 + i]
        # the greedy choice is the argmax of the full forward (up to float ties)
        assert row[tok] >= row.max() - 1e-5, (
            f"{model}: step {i}: decode chose {tok} (logit {row[tok]:.6f}), full forward's argmax is "
            f"{int(row.argmax())} ({row.max():.6f})"
        )
        assert abs(out.logprobs[i] - lsm[p - 1 + i, tok]) <= 1e-4, (
            f"{model}: step {i} (position {p + i}): decode logprob {out.logprobs[i]:.6f} != "
            f"full forward {lsm[p - 1 + i, tok]:.6f}"
        )


def test_logprobs_none_unless_requested(model, engine):
    ref = ref_for(model)
    out = greedy(engine, ref.prompt_ids, 4)
    assert out.logprobs is None


def test_logprobs_are_untempered(model, engine):
    """Sampled tokens' logprobs are those of the model's raw distribution, not the tempered one."""
    ref = ref_for(model)
    prompt = ref.prompt_ids
    out = engine.generate(prompt, max_new_tokens=12, temperature=1.7, seed=11, ignore_eos=True, logprobs=True)
    assert len(out.logprobs) == len(out.token_ids) == 12
    _, lsm = _forward_lsm(engine, prompt + out.token_ids)
    p = len(prompt)
    for i, tok in enumerate(out.token_ids):
        assert abs(out.logprobs[i] - lsm[p - 1 + i, tok]) <= 1e-4, (model, i, out.logprobs[i], lsm[p - 1 + i, tok])


# --------------------------------------------------------------------------- sampling


SAMPLE_KW = dict(max_new_tokens=16, ignore_eos=True)
# Explicit "off" values for the filters, so that a model's generation_config defaults (qwen2 has
# top_k 20, top_p 0.9) do not add filters a test does not mean to apply.
NEUTRAL = dict(top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


def test_seeded_sampling_is_reproducible(model, engine):
    ref = ref_for(model)
    prompt = ref.prompt_ids
    outs = {}
    for seed in range(5):
        a = engine.generate(prompt, temperature=1.0, seed=seed, **SAMPLE_KW)
        b = engine.generate(prompt, temperature=1.0, seed=seed, **SAMPLE_KW)
        assert a.token_ids == b.token_ids, f"{model}: seed {seed} gave two different samples"
        assert a.text == b.text
        assert len(a.token_ids) == 16
        outs[seed] = tuple(a.token_ids)
    assert len(set(outs.values())) >= 2, f"{model}: 5 different seeds all gave the same sample {outs[0]}"
    # sampling is not greedy
    g = tuple(greedy(engine, prompt, 16).token_ids)
    assert any(o != g for o in outs.values()), f"{model}: temperature 1 sampling always equals greedy"


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.8, top_k=1),
        dict(temperature=1.3, min_p=1.0),
        dict(temperature=1.0, top_p=1e-6),
        dict(temperature=0, top_k=5, top_p=0.5, min_p=0.1, seed=123),
        dict(temperature=0, repetition_penalty=1.0),
    ],
    ids=["top_k=1", "min_p=1", "top_p=tiny", "temperature=0", "repetition_penalty=1"],
)
def test_degenerate_sampling_is_greedy(model, engine, kw):
    ref = ref_for(model)
    kw = dict(kw)  # the parameter dict is shared between models
    kw.setdefault("seed", 7)
    out = engine.generate(ref.prompt_ids, max_new_tokens=N_GREEDY, ignore_eos=True, **kw)
    assert out.token_ids == ref.greedy, f"{model} {kw}: {out.token_ids} != greedy {ref.greedy}"


def _check_filter(model, engine, prompt, flt, name):
    """Sample with one filter at temperature 1 and check every chosen token passed the filter,
    judged on the full forward's distribution at its position."""
    kw = dict(NEUTRAL, temperature=1.0, seed=5, max_new_tokens=16, ignore_eos=True)
    kw[name] = flt
    out = engine.generate(prompt, **kw)
    _, lsm = _forward_lsm(engine, prompt + out.token_ids)
    p = len(prompt)
    for i, tok in enumerate(out.token_ids):
        probs = np.exp(lsm[p - 1 + i])
        pt = probs[tok]
        if name == "top_k":
            rank = int((probs > pt * (1 + 1e-6)).sum())
            assert rank < flt, f"{model}: top_k={flt}: step {i} sampled token {tok} of rank {rank}"
        elif name == "top_p":
            mass_above = float(probs[probs > pt * (1 + 1e-6)].sum())
            assert mass_above < flt + 1e-5, (
                f"{model}: top_p={flt}: step {i} sampled token {tok}; the more likely tokens already hold "
                f"{mass_above:.4f} of the mass"
            )
        elif name == "min_p":
            assert pt >= flt * probs.max() * (1 - 1e-5), (
                f"{model}: min_p={flt}: step {i} sampled token {tok} with p={pt:.3g} < {flt} * {probs.max():.3g}"
            )
    return out


@pytest.mark.parametrize("name,flt", [("top_k", 3), ("top_p", 0.3), ("min_p", 0.2)])
def test_sampling_filters(model, engine, name, flt):
    ref = ref_for(model)
    a = _check_filter(model, engine, ref.prompt_ids, flt, name)
    b = engine.generate(
        ref.prompt_ids, **dict(NEUTRAL, temperature=1.0, seed=5, max_new_tokens=16, ignore_eos=True, **{name: flt})
    )
    assert a.token_ids == b.token_ids


def _expected_dist(logits_row, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The sampling distribution of one filter applied to softmax(logits / temperature)."""
    z = logits_row.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.ones_like(p, dtype=bool)
    if top_k:
        keep &= p >= np.sort(p)[-top_k]
    if top_p < 1.0:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]  # mass of the strictly more likely tokens
        nucleus = np.zeros_like(keep)
        nucleus[order[before < top_p]] = True
        keep &= nucleus
    if min_p > 0.0:
        keep &= p >= min_p * p.max()
    q = np.where(keep, p, 0.0)
    return q / q.sum()


SAMPLERS = [
    ("llama2", dict(temperature=1.0)),
    ("llama2", dict(temperature=0.6)),
    ("llama2", dict(temperature=1.8, top_k=6)),
    ("llama2", dict(temperature=1.0, top_p=0.6)),
    ("llama2", dict(temperature=1.0, min_p=0.15)),
    ("gemma2", dict(temperature=0.8)),  # final logit soft-capping
    ("qwen2", dict(temperature=1.3, top_k=0, top_p=1.0)),  # overriding its generation_config defaults
]


@pytest.mark.parametrize(
    "model_name,kw", SAMPLERS, ids=[m + ":" + ",".join(f"{k}={v}" for k, v in kw.items()) for m, kw in SAMPLERS]
)
def test_sampling_distribution(model_name, engine_for, kw):
    """The first sampled token, over many seeds, follows softmax(logits / T) restricted by the
    filter and renormalised. Each token's frequency must lie within 5 standard deviations (+1/N)
    of its expected probability; tokens outside the filter must never appear."""
    if model_name not in MODELS:
        pytest.skip(f"no fixture {model_name}")
    ref = ref_for(model_name)
    engine = engine_for(model_name)
    prompt = ref.prompt_ids[:6]
    want = _expected_dist(engine.forward(prompt)[-1], **kw)
    n = 1000
    counts = np.zeros_like(want)
    for seed in range(n):
        out = engine.generate(prompt, max_new_tokens=1, seed=seed, ignore_eos=True, **kw)
        counts[out.token_ids[0]] += 1
    freq = counts / n
    outside = np.flatnonzero((want == 0) & (counts > 0))
    assert outside.size == 0, f"{model_name} {kw}: sampled tokens outside the filter: {outside.tolist()}"
    tol = 5 * np.sqrt(want * (1 - want) / n) + 1.0 / n
    bad = np.flatnonzero(np.abs(freq - want) > tol)
    assert bad.size == 0, f"{model_name} {kw}: token frequencies off: " + ", ".join(
        f"{t}: {freq[t]:.3f} vs {want[t]:.3f}" for t in bad[:8]
    )


@pytest.mark.parametrize("model_name", ["llama2", "qwen3", "gemma2"])
def test_repetition_penalty_greedy(model_name, engine_for):
    """Greedy decoding with a repetition penalty, recomputed step by step from full forwards with
    Hugging Face's rule: every token id already present (prompt and generated so far) has its logit
    divided by the penalty when positive, multiplied by it when negative."""
    if model_name not in MODELS:
        pytest.skip(f"no fixture {model_name}")
    ref = ref_for(model_name)
    engine = engine_for(model_name)
    penalty = 1.8
    n = 10
    out = engine.generate(ref.prompt_ids, max_new_tokens=n, temperature=0, repetition_penalty=penalty, ignore_eos=True)
    seq = list(ref.prompt_ids)
    for i in range(n):
        row = engine.forward(seq)[-1].astype(np.float64)
        seen = np.array(sorted(set(seq)))
        row[seen] = np.where(row[seen] > 0, row[seen] / penalty, row[seen] * penalty)
        order = np.argsort(-row)
        if row[order[0]] - row[order[1]] < 1e-5:
            break  # a near tie: the rest of the sequence is not determined
        expect = int(order[0])
        assert out.token_ids[i] == expect, (
            f"{model_name}: step {i}: with repetition_penalty={penalty} the engine chose {out.token_ids[i]}, "
            f"expected {expect} (unpenalised greedy: {ref.greedy[:n]})"
        )
        seq.append(expect)
    assert out.token_ids != ref.greedy[:n], "the penalty had no effect on these fixtures"


# --------------------------------------------------------------------------- stopping


def _full(engine, ref, n=N_GREEDY):
    return greedy(engine, ref.prompt_ids, n)


def _pick_stop(text: str, frac: float, length: int = 3) -> str:
    """A substring of `text` near position frac*len(text), without whitespace at its ends and
    without replacement characters."""
    n = len(text)
    starts = sorted(range(0, max(1, n - length + 1)), key=lambda s: abs(s - int(frac * n)))
    for s in starts:
        piece = text[s : s + length]
        if len(piece) == length and piece.strip() == piece and "\ufffd" not in piece and text.find(piece) > 0:
            return piece
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_string(model, engine):
    ref = ref_for(model)
    full = _full(engine, ref)
    assert full.text, f"{model}: empty greedy text"
    for frac in (0.3, 0.7):
        stop = _pick_stop(full.text, frac)
        cut = full.text.find(stop)
        out = engine.generate(ref.prompt_ids, max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True, stop=[stop])
        assert out.finish_reason == "stop", (model, stop, out.text)
        assert out.text == full.text[:cut], f"{model}: stop={stop!r}: text {out.text!r}, want {full.text[:cut]!r}"
        k = len(out.token_ids)
        # token ids keep every generated token, up to the one that completed the stop string
        assert out.token_ids == full.token_ids[:k]
        assert out.usage.completion_tokens == k
        # ... and generation ended as soon as the stop string appeared
        assert stop in engine.generate(ref.prompt_ids, max_new_tokens=k, temperature=0, ignore_eos=True).text
        assert stop not in engine.generate(ref.prompt_ids, max_new_tokens=k - 1, temperature=0, ignore_eos=True).text


def test_stop_string_edge_cases(model, engine):
    ref = ref_for(model)
    full = _full(engine, ref)
    # a stop string at the very start of the generated text: nothing is returned
    head = full.text[:2]
    if "\ufffd" not in head and head.strip() == head and head:
        out = engine.generate(ref.prompt_ids, max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True, stop=[head])
        assert out.text == "" and out.finish_reason == "stop"
        assert out.token_ids == full.token_ids[: len(out.token_ids)]
        it = engine.stream(ref.prompt_ids, max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True, stop=[head])
        assert list(it) in ([], [""]) and it.result.finish_reason == "stop"
    # stop strings are looked for in the generated text only, not in the prompt
    prompt_text = ref.json.get("prompt") or engine.detokenize(ref.prompt_ids, skip_special_tokens=True)
    tail = prompt_text[-5:]
    assert engine.detokenize(ref.prompt_ids, skip_special_tokens=True).endswith(tail)
    if tail not in full.text:
        out = engine.generate(ref.prompt_ids, max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True, stop=[tail])
        assert out.finish_reason == "length" and out.token_ids == full.token_ids, "stop string matched the prompt"
    # logprobs stay aligned with token_ids when a stop string ends generation
    stop = _pick_stop(full.text, 0.5)
    out = engine.generate(
        ref.prompt_ids, max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True, stop=[stop], logprobs=True
    )
    assert len(out.logprobs) == len(out.token_ids)


def test_stop_string_several_and_absent(model, engine):
    ref = ref_for(model)
    full = _full(engine, ref)
    early, late = _pick_stop(full.text, 0.3), _pick_stop(full.text, 0.8)
    absent = "\u2603never\u2603"
    assert absent not in full.text
    out = engine.generate(
        ref.prompt_ids, max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True, stop=[late, absent, early]
    )
    first = min(full.text.find(early), full.text.find(late))
    assert out.finish_reason == "stop"
    assert out.text == full.text[:first]
    none = engine.generate(ref.prompt_ids, max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True, stop=[absent])
    assert none.finish_reason == "length"
    assert none.text == full.text and none.token_ids == full.token_ids


def test_stop_token_ids(model, engine):
    ref = ref_for(model)
    full = _full(engine, ref)
    tok = full.token_ids[6]
    j = full.token_ids.index(tok)
    out = engine.generate(ref.prompt_ids, max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True, stop_token_ids=[tok])
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: j + 1], "the stop token is the last of token_ids"
    assert out.usage.completion_tokens == j + 1
    # the stop token's text is not in .text
    before = engine.generate(ref.prompt_ids, max_new_tokens=j, temperature=0, ignore_eos=True)
    assert out.text == before.text
    # streaming agrees
    it = engine.stream(ref.prompt_ids, max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True, stop_token_ids=[tok])
    assert "".join(it) == out.text
    assert it.result.finish_reason == "stop" and it.result.token_ids == out.token_ids


def _find_eos_setup(engine, ref, eos):
    """Find a prefix and sampling settings whose first generated token is the EOS token `eos`.

    Random-weight models rarely choose EOS greedily, so: over the full forward of the prompt and its
    greedy continuation, take the position where `eos` ranks best (rank r), and sample from the
    top r+1 tokens at a high temperature with different seeds until `eos` comes out."""
    seq = ref.prompt_ids + ref.greedy
    full = engine.forward(seq)
    rank, pos = min((int((full[p] > full[p][eos]).sum()), p) for p in range(len(ref.prompt_ids) - 1, len(seq)))
    prefix = seq[: pos + 1]
    if rank == 0:
        return prefix, dict(temperature=0)
    for seed in range(max(40, 8 * (rank + 1))):
        kw = dict(NEUTRAL, temperature=50.0, top_k=rank + 1, seed=seed)
        out = engine.generate(prefix, max_new_tokens=1, ignore_eos=True, **kw)
        if out.token_ids[0] == eos:
            return prefix, kw
    pytest.fail(f"{ref.name}: could not make the model produce EOS {eos} (best rank {rank})")


def test_eos_stops_unless_ignored(model, engine):
    ref = ref_for(model)
    assert sorted(engine.eos_token_ids) == sorted(ref.eos_token_ids)
    for eos in engine.eos_token_ids:
        prefix, kw = _find_eos_setup(engine, ref, eos)
        out = engine.generate(prefix, max_new_tokens=5, logprobs=True, **kw)
        assert out.token_ids == [eos], f"{model}: EOS {eos} did not stop generation: {out.token_ids}"
        assert out.finish_reason == "stop"
        assert out.text == "", "the EOS token's text is not part of .text"
        assert out.usage.completion_tokens == 1
        assert len(out.logprobs) == 1
        ign = engine.generate(prefix, max_new_tokens=5, ignore_eos=True, **kw)
        assert len(ign.token_ids) == 5 and ign.token_ids[0] == eos
        assert ign.finish_reason == "length"
        it = engine.stream(prefix, max_new_tokens=5, **kw)
        assert "".join(it) == ""
        assert it.result.token_ids == [eos] and it.result.finish_reason == "stop"


def test_stop_token_ids_work_with_ignore_eos(model, engine):
    """ignore_eos only disables EOS; explicit stop_token_ids still stop."""
    ref = ref_for(model)
    tok = ref.greedy[3]
    out = engine.generate(ref.prompt_ids, max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True, stop_token_ids=[tok])
    assert out.finish_reason == "stop" and out.token_ids[-1] == tok and len(out.token_ids) <= 4


# --------------------------------------------------------------------------- streaming


def test_stream_joins_to_generate(model, engine):
    ref = ref_for(model)
    for prompt in (ref.prompt_ids, ref["texts"][0]):
        kw = dict(max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True)
        out = engine.generate(prompt, **kw)
        it = engine.stream(prompt, **kw)
        deltas = list(it)
        assert all(isinstance(d, str) for d in deltas)
        assert "".join(deltas) == out.text, f"{model}: stream {deltas!r} != generate {out.text!r}"
        res = it.result
        assert res.text == out.text
        assert res.token_ids == out.token_ids
        assert res.finish_reason == out.finish_reason == "length"
        assert res.usage.prompt_tokens == out.usage.prompt_tokens
        assert res.usage.completion_tokens == len(res.token_ids)


def test_stream_sampled_joins_to_generate(model, engine):
    ref = ref_for(model)
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)
    out = engine.generate(ref.prompt_ids, **kw)
    it = engine.stream(ref.prompt_ids, **kw)
    assert "".join(it) == out.text
    assert it.result.token_ids == out.token_ids


def test_stream_with_stop_string(model, engine):
    ref = ref_for(model)
    full = _full(engine, ref)
    for frac in (0.3, 0.7):
        stop = _pick_stop(full.text, frac, length=4)
        kw = dict(max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True, stop=[stop])
        out = engine.generate(ref.prompt_ids, **kw)
        it = engine.stream(ref.prompt_ids, **kw)
        deltas = list(it)
        joined = "".join(deltas)
        assert joined == out.text == full.text[: full.text.find(stop)], (model, stop, deltas)
        assert not any(stop in d for d in deltas)
        assert stop not in joined
        assert it.result.finish_reason == "stop"
        assert it.result.token_ids == out.token_ids


def test_stream_holds_back_partial_stop_string(model, engine):
    """A stop string whose beginning appears in the output but that never completes: everything
    is eventually yielded, nothing is lost."""
    ref = ref_for(model)
    full = _full(engine, ref)
    piece = _pick_stop(full.text, 0.9, length=2)
    stop = piece + "\u2603"  # begins like the text's end but never completes
    kw = dict(max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True, stop=[stop])
    it = engine.stream(ref.prompt_ids, **kw)
    assert "".join(it) == full.text
    assert it.result.finish_reason == "length"


def _within(seconds, fn):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not finish in time."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"did not finish within {seconds} s (deadlock?)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_abandoned_stream_does_not_block(model, engine):
    ref = ref_for(model)
    it = engine.stream(ref.prompt_ids, max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True)
    next(it)
    del it
    gc.collect()
    out = _within(30, lambda: greedy(engine, ref.prompt_ids, N_GREEDY))
    assert out.token_ids == ref.greedy


def test_interleaved_streams(model, engine):
    """Two streams on one engine, advanced alternately from one thread, are independent."""
    ref = ref_for(model)
    a_kw = dict(max_new_tokens=N_GREEDY, temperature=0, ignore_eos=True)
    b_kw = dict(max_new_tokens=N_GREEDY, temperature=1.0, seed=4, ignore_eos=True)
    a_want = engine.generate(ref.prompt_ids, **a_kw)
    b_want = engine.generate(ref["texts"][0], **b_kw)

    def interleave():
        a, b = engine.stream(ref.prompt_ids, **a_kw), engine.stream(ref["texts"][0], **b_kw)
        da, db = [], []
        live = {"a": True, "b": True}
        while any(live.values()):
            for key, it, acc in (("a", a, da), ("b", b, db)):
                if live[key]:
                    try:
                        acc.append(next(it))
                    except StopIteration:
                        live[key] = False
        return "".join(da), a.result, "".join(db), b.result

    ta, ra, tb, rb = _within(60, interleave)
    assert ta == a_want.text and ra.token_ids == a_want.token_ids
    assert tb == b_want.text and rb.token_ids == b_want.token_ids


# --------------------------------------------------------------------------- batches


def _same_result(a, b, what):
    assert a.token_ids == b.token_ids, what
    assert a.text == b.text, what
    assert a.finish_reason == b.finish_reason, what
    assert a.usage.prompt_tokens == b.usage.prompt_tokens, what
    assert a.usage.completion_tokens == b.usage.completion_tokens, what


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_batch_equals_one_by_one(model, engine, sampled):
    ref = ref_for(model)
    kw = dict(max_new_tokens=10, ignore_eos=True)
    kw.update(dict(temperature=1.0, seed=9) if sampled else dict(temperature=0))
    str_prompts = list(ref["texts"][:3])
    id_prompts = [ref.prompt_ids, ref.prompt_ids[:5], list(ref["text_ids"][0])]
    for prompts in (str_prompts, id_prompts):
        batch = engine.generate(prompts, **kw)
        assert isinstance(batch, list) and len(batch) == len(prompts)
        for p, b in zip(prompts, batch, strict=True):
            _same_result(b, engine.generate(p, **kw), (model, p))


def test_chat_batch_equals_one_by_one(model, engine):
    ref = ref_for(model)
    convs = [ref["chat_messages"], [{"role": "user", "content": ref["texts"][0]}]]
    kw = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    batch = engine.chat(convs, **kw)
    assert isinstance(batch, list) and len(batch) == 2
    for c, b in zip(convs, batch, strict=True):
        _same_result(b, engine.chat(c, **kw), (model, c))


def test_single_prompt_returns_single_result(model, engine):
    ref = ref_for(model)
    out = engine.generate(ref.prompt_ids, max_new_tokens=2, temperature=0)
    assert not isinstance(out, list)
    out = engine.generate(ref["texts"][0], max_new_tokens=2, temperature=0)
    assert not isinstance(out, list)


# --------------------------------------------------------------------------- limits, usage, defaults


def test_max_new_tokens_zero(model, engine):
    ref = ref_for(model)
    out = engine.generate(ref.prompt_ids, max_new_tokens=0, logprobs=True)
    assert out.token_ids == [] and out.text == ""
    assert out.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ref.prompt_ids)
    assert out.usage.completion_tokens == 0
    assert out.logprobs == []
    it = engine.stream(ref.prompt_ids, max_new_tokens=0)
    assert list(it) == []
    assert it.result.token_ids == [] and it.result.finish_reason == "length"


def test_usage_and_timings(model, engine):
    ref = ref_for(model)
    text = ref["texts"][0]
    out = engine.generate(text, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert out.usage.prompt_tokens == len(engine.tokenize(text))
    assert out.usage.completion_tokens == len(out.token_ids) == 12
    t = out.timings
    for v in (t.prefill_s, t.decode_s, t.decode_tokens_per_s):
        assert isinstance(v, float) and math.isfinite(v) and v >= 0, (
            model,
            t.prefill_s,
            t.decode_s,
            t.decode_tokens_per_s,
        )
    assert t.prefill_s > 0
    assert t.decode_s > 0
    # decode speed: the decoded tokens (with or without the one the prefill produced) over decode time
    lo, hi = (12 - 1) / t.decode_s, 12 / t.decode_s
    assert lo * 0.99 <= t.decode_tokens_per_s <= hi * 1.01, (t.decode_tokens_per_s, lo, hi)
    # results do not depend on the prompt being given as text or ids
    ids = engine.generate(engine.tokenize(text), max_new_tokens=12, temperature=0, ignore_eos=True)
    assert ids.token_ids == out.token_ids and ids.text == out.text


def test_context_limit_gives_length(model, engine):
    ref = ref_for(model)
    max_pos = ref.max_position_embeddings
    if max_pos > 4096:
        pytest.skip(f"{model}: max_position_embeddings {max_pos} too large for a quick test")
    ids = (ref.prompt_ids * (max_pos // len(ref.prompt_ids) + 1))[: max_pos - 3]
    out = engine.generate(ids, max_new_tokens=50, temperature=0, ignore_eos=True)
    assert out.finish_reason == "length"
    # prompt + generated never exceeds the context length
    assert len(ids) + len(out.token_ids) == max_pos, (len(ids), len(out.token_ids), max_pos)
    # a prompt one shorter than the context still generates one token
    out = engine.generate(ids + [ids[-1], ids[-2]], max_new_tokens=5, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 1 and out.finish_reason == "length"


@pytest.mark.parametrize("model_name", ["llama2", "qwen2"])
def test_default_max_new_tokens(model_name, engine_for):
    if model_name not in MODELS:
        pytest.skip(f"no fixture {model_name}")
    ref = ref_for(model_name)
    engine = engine_for(model_name)
    gc_path = ref.dir / "generation_config.json"
    gc = json.loads(gc_path.read_text()) if gc_path.exists() else {}
    want = gc.get("max_new_tokens", 256)
    prompt = ref.prompt_ids[:4]
    want = min(want, ref.max_position_embeddings - len(prompt))
    out = engine.generate(prompt, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == want and out.finish_reason == "length"


def test_generation_defaults_from_generation_config(engine_for):
    name = "qwen2"
    if name not in MODELS:
        pytest.skip("no qwen2 fixture")
    ref = ref_for(name)
    engine = engine_for(name)
    gc = json.loads((ref.dir / "generation_config.json").read_text())
    d = engine.generation_defaults
    assert isinstance(d, dict)
    for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens"):
        if key in gc:
            assert d.get(key) == pytest.approx(gc[key]), (key, d.get(key), gc[key])
    assert gc.get("do_sample") is True and gc["temperature"] == pytest.approx(0.7)
    gc_eos = gc.get("eos_token_id")
    if gc_eos is not None:
        gc_eos = [gc_eos] if isinstance(gc_eos, int) else gc_eos
        assert set(gc_eos) <= set(engine.eos_token_ids), (gc_eos, engine.eos_token_ids)

    # Options left at None take these defaults: the same samples as passing them explicitly.
    explicit = {k: gc[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty") if k in gc}
    for seed in (1, 2, 3):
        a = engine.generate(ref.prompt_ids, max_new_tokens=12, seed=seed, ignore_eos=True)
        b = engine.generate(ref.prompt_ids, max_new_tokens=12, seed=seed, ignore_eos=True, **explicit)
        assert a.token_ids == b.token_ids, (seed, a.token_ids, b.token_ids)
    samples = [engine.generate(ref.prompt_ids, max_new_tokens=12, seed=s, ignore_eos=True).token_ids for s in range(4)]
    assert any(s != ref.greedy[:12] for s in samples), "qwen2's defaults (temperature 0.7) should sample, not be greedy"


def _has_sampling_defaults(name: str) -> bool:
    path = ref_for(name).dir / "generation_config.json"
    return path.exists() and bool(json.loads(path.read_text()).get("do_sample"))


@pytest.mark.parametrize("model_name", [m for m in MODELS if not _has_sampling_defaults(m)])
def test_no_sampling_defaults_means_greedy(model_name, engine_for):
    """Without do_sample in generation_config.json, options left at None decode greedily."""
    ref = ref_for(model_name)
    engine = engine_for(model_name)
    out = engine.generate(ref.prompt_ids, max_new_tokens=N_GREEDY, ignore_eos=True, seed=3)
    assert out.token_ids == ref.greedy


# --------------------------------------------------------------------------- chat


def test_chat_applies_template(model, engine):
    ref = ref_for(model)
    kw = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    out = engine.chat(ref["chat_messages"], **kw)
    assert out.usage.prompt_tokens == len(ref["chat_ids"]), "chat() must tokenize the template like HF"
    direct = engine.generate(list(ref["chat_ids"]), **kw)
    _same_result(out, direct, model)
