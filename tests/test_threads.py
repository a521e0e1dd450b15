"""One Engine used from several Python threads at once; the GIL is released during compute."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import MODELS, ref_for

THREAD_MODELS = [m for m in ("llama3", "gemma2") if m in MODELS] or MODELS[:1]


def _requests(ref):
    """A mix of greedy, sampled, streamed and batched requests."""
    p = ref.prompt_ids
    texts = ref["texts"]
    reqs = []
    for i in range(4):
        reqs.append(("generate", p[: 10 + 5 * i], dict(max_new_tokens=12, temperature=0, ignore_eos=True)))
        reqs.append(("generate", p, dict(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=100 + i, ignore_eos=True)))
        reqs.append(
            ("stream", texts[i % len(texts)], dict(max_new_tokens=10, temperature=0.8, seed=i, ignore_eos=True))
        )
        reqs.append(("forward", p[: 8 + i], {}))
    reqs.append(("generate", [p[:6], p[:9]], dict(max_new_tokens=8, temperature=0, ignore_eos=True)))
    return reqs


def _run(engine, req):
    kind, prompt, kw = req
    if kind == "generate":
        out = engine.generate(prompt, **kw)
        outs = out if isinstance(out, list) else [out]
        return [(o.token_ids, o.text, o.finish_reason) for o in outs]
    if kind == "stream":
        it = engine.stream(prompt, **kw)
        text = "".join(it)
        return (text, it.result.token_ids)
    if kind == "forward":
        return engine.forward(prompt).tobytes()
    raise AssertionError(kind)


@pytest.mark.parametrize("model_name", THREAD_MODELS)
def test_threads_match_sequential(model_name, engine_for):
    ref = ref_for(model_name)
    engine = engine_for(model_name)
    reqs = _requests(ref)
    sequential = [_run(engine, q) for q in reqs]
    # every request several times, interleaved over 4 threads
    work = list(range(len(reqs))) * 3
    barrier = threading.Barrier(4)

    def worker(k):
        barrier.wait()
        return [(i, _run(engine, reqs[i])) for i in work[k::4]]

    with ThreadPoolExecutor(4) as ex:
        results = [r for chunk in ex.map(worker, range(4)) for r in chunk]
    assert len(results) == len(work)
    for i, got in results:
        assert got == sequential[i], f"{model_name}: request {reqs[i][0]} #{i} differs when run from threads"


def test_gil_released_during_generate(engine_for):
    """A pure-Python thread keeps running while a long generate() runs in another thread.

    If generate() held the GIL, the Python thread could not run at all while it computes: its
    longest pause would be about the whole generate() call. We require that pause to stay well
    below the call's duration and that the thread makes many iterations meanwhile.
    """
    name = THREAD_MODELS[0]
    ref = ref_for(name)
    engine = engine_for(name)
    prompt = ref.prompt_ids
    kw = dict(temperature=0, ignore_eos=True)
    room = ref.max_position_embeddings - len(prompt) - 1
    n = min(64, room)
    # calibrate the call so that it lasts at least ~0.6 s (a batch is one call)
    t0 = time.perf_counter()
    engine.generate(prompt, max_new_tokens=n, **kw)
    one = max(time.perf_counter() - t0, 1e-4)
    reps = max(1, min(200, int(0.6 / one) + 1))
    batch = [prompt] * reps

    done = threading.Event()
    span = {}

    def long_call():
        span["start"] = time.perf_counter()
        engine.generate(batch, max_new_tokens=n, **kw)
        span["end"] = time.perf_counter()
        done.set()

    th = threading.Thread(target=long_call)
    count = 0
    stamps = []
    th.start()
    while not done.is_set():
        count += 1
        if count % 64 == 0:
            stamps.append(time.perf_counter())
    th.join()
    duration = span["end"] - span["start"]
    inside = [s for s in stamps if span["start"] <= s <= span["end"]]
    points = [span["start"]] + inside + [span["end"]]
    longest = max(b - a for a, b in zip(points[:-1], points[1:], strict=True))
    assert duration > 0.2, f"generate too short ({duration:.3f} s) to judge"
    assert longest < 0.5 * duration, (
        f"the Python thread stalled for {longest:.3f} s of a {duration:.3f} s generate(): the GIL is held"
    )
    assert len(inside) >= 20, f"only {len(inside) * 64} Python iterations during a {duration:.3f} s generate()"
