"""The CUDA backend against the CPU engine, on every fixture model.

Every check here compares ``device="cuda"`` with ``device="cpu"`` (which test_parity.py ties to
Hugging Face transformers) on the same model files. The tests skip, with the reason, unless a GPU
is usable: ``tda_engine`` built with the ``cuda`` feature and ``Engine.from_pretrained(...,
device="cuda")`` succeeding. Two tests run on every machine: ``device="cuda"`` on a build without
CUDA must raise a ValueError that says so, and a bad device ordinal must raise a ValueError naming
it. With ``TDA_CUDA_REQUIRED=1`` (set by scripts/gpu_check.sh on the GPU machine) a CUDA that is not
usable fails the tests instead of skipping them.

Runs under pytest, or without it (the GPU machine may lack it)::

    python tests/test_cuda.py [-k SUBSTRING] [-x]
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

try:
    import pytest
except ImportError:  # standalone: see the runner at the end
    pytest = None

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "tests" / "fixtures" / "models"
MANIFEST = REPO / "tests" / "fixtures" / "manifest.json"
# The model that decides whether CUDA is usable (the smallest single-file fixture).
PROBE = "llama2"

# ----------------------------------------------------------------------------------------------
# Tolerances (numbers measured on these fixtures, whose logits reach 4.7-11.5 in magnitude).
#
# float32, CUDA vs CPU: max |logit_cuda - logit_cpu| <= F32_TOL, absolute. Both engines compute in
# float32 with float32 accumulation on the same float32 weights and differ only in summation order
# (blocked or tree reductions on the device): ~1e-6 relative per dot product. The CPU engine and
# HF transformers, two unrelated float32 implementations, differ by at most 1.4e-5 here (the
# parity suite allows 1e-4). 1e-3 is ~70x that spread, and still under what a real defect gives:
# TF32 matrix products round their inputs to 2^-11 (~5e-3 at these magnitudes), a bf16 cast to
# 2^-8 (~4e-2), and a wrong norm, rope, mask or index is off by O(1).
F32_TOL = 1e-3
# Log-probabilities: log_softmax moves by at most twice the largest logit change.
LOGPROB_TOL = 2 * F32_TOL
#
# bfloat16 / float16, CUDA vs CPU in the same dtype: max |delta| <= REDUCED_TOL[D] * max |logit_cpu|.
# Both engines read the same D-rounded weights, so the weight rounding cancels; it is most of the
# CPU engine's error against float32 (bf16: 1.1-1.5% of the logit scale; f16: 0.12-0.21%), since
# the engine keeps activations in float32 (kernels/mod.rs). An identical design on the device
# leaves summation order (~1e-5 of the scale). The bound also admits a device that rounds its
# activations to D for tensor-core products, which is what HF's all-D model adds on top of the
# weight rounding: HF bf16 is 1.8-3.2% from float32, so activation rounding adds at most
# ~1.8% (< 2e-2); HF f16 is 0.28-0.57%, activation rounding at most ~0.4% (< 5e-3). Misread
# bf16/f16 weights (byte order, a wrong shift) or a kernel bug are off by O(scale).
REDUCED_TOL = {"bfloat16": 2e-2, "float16": 5e-3}
# Against HF's float32 reference, the CUDA engine in dtype D meets test_parity.py's bound, the one
# the CPU engine meets: 1.5 * (HF's own D error) + 2 * u_D * max |logit|.
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
HF_KEY = {"bfloat16": "logits_bf16", "float16": "logits_f16"}
# Calibrated TDA thresholds are quantiles of neuron scores computed in float32: CUDA and CPU
# scores differ at ~1e-6 relative, and a quantile moves with them continuously.
THRESHOLD_RTOL = 1e-3
# A KV cache the device cannot hold: llama2 has 2 layers of 64 KV values per position, f32, so
# 2^28 positions need 2 layers x (K + V) x 64 GiB = 256 GiB, against ~139 GiB on an H200.
HUGE_CONTEXT = 2**28
OOM_TIMEOUT_S = 90
MODEL_INFO_KEYS = [
    "architecture",
    "num_layers",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "dtype",
    "decode_weight_bytes",
    "ffn_weight_bytes",
]


# ----------------------------------------------------------------------------------------------
# pytest, or the standalone stand-ins


class Skipped(Exception):
    pass


def skip(reason: str):
    if pytest is not None:
        pytest.skip(reason)
    raise Skipped(reason)


def params(name: str, values):
    """pytest.mark.parametrize, also recorded for the standalone runner."""
    values = list(values)

    def deco(fn):
        fn._params = [(name, values), *getattr(fn, "_params", [])]
        if pytest is not None:
            fn = pytest.mark.parametrize(name, values)(fn)
        return fn

    return deco


def _manifest_models() -> list[str]:
    if not MANIFEST.exists():
        return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").exists())
    data = json.loads(MANIFEST.read_text())
    models = data.get("models", data) if isinstance(data, dict) else data
    if isinstance(models, dict):
        return list(models)
    return [m if isinstance(m, str) else m["name"] for m in models]


MODELS = _manifest_models()


def model_dir(name: str) -> Path:
    d = MODELS_DIR / name
    if not (d / "config.json").exists():
        raise AssertionError(f"fixture model {name!r} is missing: {d} (regenerate tests/fixtures)")
    return d


@functools.cache
def ref(name: str) -> dict:
    d = model_dir(name)
    with np.load(d / "reference.npz") as z:
        npz = {k: z[k] for k in z.files}
    js = json.loads((d / "reference.json").read_text())
    prompt = [int(x) for x in npz["prompt_ids"].reshape(-1)]
    logits = npz["logits"].reshape(len(prompt), -1).astype(np.float32)
    return {
        "prompt": prompt,
        "logits": logits,
        "npz": npz,
        "json": js,
        "greedy": [int(x) for x in npz["greedy"].ravel()],
    }


# ----------------------------------------------------------------------------------------------
# Whether CUDA is usable, and the engines

_ENGINES: dict = {}
_LOCK = threading.Lock()


def _no_cuda_build(msg: str) -> bool:
    """Whether a ValueError from device="cuda" says the build has no CUDA (rather than no GPU)."""
    m = msg.lower()
    return any(s in m for s in ("no cuda support", "without cuda", "not built with", "built without"))


@functools.cache
def cuda_status() -> tuple[str, str]:
    """("ok", device) | ("no-cuda-build", message) | ("no-gpu", message) | ("error", description)."""
    from tda_engine import Engine

    try:
        eng = Engine.from_pretrained(str(model_dir(PROBE)), device="cuda", dtype="float32")
    except ValueError as e:
        return ("no-cuda-build" if _no_cuda_build(str(e)) else "no-gpu"), str(e)
    except BaseException as e:  # a panic or a crash-like error is a bug, not "no GPU"
        return "error", f"{type(e).__module__}.{type(e).__name__}: {e}"
    _ENGINES[(PROBE, "cuda", "float32")] = eng
    return "ok", str(eng.model_info.get("device"))


def need_cuda() -> None:
    kind, msg = cuda_status()
    if kind == "ok":
        return
    if kind == "error":
        raise AssertionError(
            f'Engine.from_pretrained(..., device="cuda") raised something other than ValueError: {msg}'
        )
    why = "this tda_engine build has no CUDA support" if kind == "no-cuda-build" else "no usable GPU"
    reason = f"CUDA not usable: {why} (ValueError: {msg})"
    if os.environ.get("TDA_CUDA_REQUIRED", "") not in ("", "0"):
        raise AssertionError(f"TDA_CUDA_REQUIRED is set, but {reason}")
    skip(reason)


def engine(name: str, device: str, dtype: str = "float32"):
    """A process-wide cached engine (the CUDA one only when CUDA is usable)."""
    from tda_engine import Engine

    if device != "cpu":
        need_cuda()
    key = (name, device, dtype)
    with _LOCK:
        if key not in _ENGINES:
            try:
                _ENGINES[key] = Engine.from_pretrained(str(model_dir(name)), device=device, dtype=dtype)
            except ValueError as e:
                if device != "cpu" and dtype == "float16" and "float16" in str(e):
                    skip(f"the CUDA backend does not take float16: {e}")
                raise
        return _ENGINES[key]


def pair(name: str, dtype: str = "float32"):
    """(cuda engine, cpu engine)."""
    return engine(name, "cuda", dtype), engine(name, "cpu", dtype)


def greedy(eng, prompt, n: int, **kw):
    return eng.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


def scale_of(logits: np.ndarray) -> float:
    return float(np.abs(logits).max())


def assert_close_logits(got: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite values from CUDA"
    diff = np.abs(got - want)
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    rows = np.round(diff.reshape(len(diff), -1).max(axis=1), 6).tolist()[:48]
    assert diff.max() <= tol, (
        f"{what}: max |cuda - cpu| = {diff.max():.3g} > {tol:.3g} at {tuple(int(i) for i in worst)} "
        f"(cuda {got[worst]:.6f}, cpu {want[worst]:.6f}); per-row max {rows}"
    )


def assert_same_tokens(cuda_ids, cpu_ids, cpu_eng, prompt, what: str) -> None:
    """Identical token lists; on a mismatch, the CPU's top-2 margin where they part (a near-tie
    under F32_TOL would be rounding, anything larger a bug)."""
    if list(cuda_ids) == list(cpu_ids):
        return
    i = next(
        (k for k, (a, b) in enumerate(zip(cuda_ids, cpu_ids, strict=False)) if a != b), min(len(cuda_ids), len(cpu_ids))
    )
    detail = ""
    if i < min(len(cuda_ids), len(cpu_ids)):
        row = cpu_eng.forward(list(prompt) + list(cpu_ids[:i]))[-1]
        top = np.sort(row)[-2:]
        detail = (
            f"; at step {i} cpu chose {cpu_ids[i]} (logit {row[cpu_ids[i]]:.5f}), cuda {cuda_ids[i]} "
            f"(cpu logit {row[cuda_ids[i]]:.5f}); cpu top-2 margin {top[1] - top[0]:.3g}"
        )
    raise AssertionError(f"{what}: cuda {list(cuda_ids)} != cpu {list(cpu_ids)}{detail}")


# ----------------------------------------------------------------------------------------------
# Every machine: the error paths that need no GPU


def test_cuda_device_either_works_or_says_why():
    """device="cuda" loads, or raises a ValueError that mentions CUDA; never a panic. On a build
    without CUDA (the CPU machines) the ValueError says that the build has no CUDA support."""
    kind, msg = cuda_status()
    if kind == "error":
        raise AssertionError(msg)
    if kind == "ok":
        assert msg == "cuda:0", f'device="cuda" gave model_info["device"] == {msg!r}, expected "cuda:0"'
        return
    assert "cuda" in msg.lower(), f"ValueError for device='cuda' does not mention CUDA: {msg!r}"
    if os.environ.get("TDA_CUDA_REQUIRED", "") not in ("", "0"):
        raise AssertionError(f"TDA_CUDA_REQUIRED is set, but device='cuda' failed: {msg}")


@params("device", ["cuda:99", "cuda:x", "cuda:-1"])
def test_bad_cuda_device_names_it(device):
    """A device that does not exist is a ValueError naming it, on every machine: a build without
    CUDA and a machine without a GPU refuse any cuda device by its name too."""
    from tda_engine import Engine

    kind, _ = cuda_status()
    with_name = device.split(":", 1)[1]
    try:
        Engine.from_pretrained(str(model_dir(PROBE)), device=device)
    except ValueError as e:
        assert with_name in str(e), f"ValueError for device={device!r} does not name {with_name!r}: {e}"
    except BaseException as e:
        raise AssertionError(f"device={device!r}: expected ValueError, got {type(e).__name__}: {e}") from e
    else:
        raise AssertionError(f"device={device!r} loaded")
    if kind == "ok":
        # the engines already loaded are unaffected
        cuda_eng, cpu_eng = pair(PROBE)
        r = ref(PROBE)
        assert_same_tokens(
            greedy(cuda_eng, r["prompt"], 8).token_ids,
            greedy(cpu_eng, r["prompt"], 8).token_ids,
            cpu_eng,
            r["prompt"],
            "after a bad device",
        )


# ----------------------------------------------------------------------------------------------
# With a GPU: the same answers as the CPU


@params("model", MODELS)
def test_model_info_device(model):
    cuda_eng, cpu_eng = pair(model)
    a, b = dict(cuda_eng.model_info), dict(cpu_eng.model_info)
    assert a["device"] == "cuda:0", a["device"]
    assert b["device"] == "cpu"
    # the model's description is the same wherever it runs
    shape = [k for k in MODEL_INFO_KEYS if k in b]
    diff = {k: (a.get(k), b[k]) for k in shape if a.get(k) != b[k]}
    assert not diff, f"model_info differs between CUDA and CPU (cuda, cpu): {diff}"
    assert cuda_eng.eos_token_ids == cpu_eng.eos_token_ids


@params("length", ["one", "prompt", "long"])
@params("model", MODELS)
def test_forward_f32(model, length):
    """Logits at every position: one token (the single-row kernels), the 41-token prompt, and
    ~200 tokens (attention past one tile, and past the sliding window of mistral/gemma2/gemma3)."""
    cuda_eng, cpu_eng = pair(model)
    r = ref(model)
    ids = {"one": r["prompt"][:1], "prompt": r["prompt"], "long": (r["prompt"] * 5)[:200]}[length]
    want = cpu_eng.forward(ids)
    got = cuda_eng.forward(ids)
    assert got.dtype == np.float32
    assert_close_logits(got, want, F32_TOL, f"{model} f32 forward ({len(ids)} tokens)")


@params("dtype", ["bfloat16", "float16"])
@params("model", MODELS)
def test_forward_reduced_precision(model, dtype):
    cuda_eng, cpu_eng = pair(model, dtype)
    r = ref(model)
    assert cuda_eng.model_info["dtype"] == dtype
    want = cpu_eng.forward(r["prompt"])
    got = cuda_eng.forward(r["prompt"])
    assert_close_logits(got, want, REDUCED_TOL[dtype] * scale_of(want), f"{model} {dtype} forward vs the CPU's")
    # and the accuracy contract test_parity.py holds the CPU engine to, against HF's float32
    hf = r["npz"][HF_KEY[dtype]].reshape(r["logits"].shape).astype(np.float32)
    hf_err = float(np.abs(hf - r["logits"]).max())
    bound = 1.5 * hf_err + 2 * UNIT_ROUNDOFF[dtype] * scale_of(r["logits"])
    err = float(np.abs(got - r["logits"]).max())
    assert err <= bound, (
        f"{model} {dtype}: CUDA max error vs HF float32 {err:.4g} > {bound:.4g} (HF's own {hf_err:.4g})"
    )


@params("model", MODELS)
def test_generate_reduced_precision_consistent(model):
    """bf16 decoding on the device chooses, at each step, a token at the top of its own forward's
    logits (up to the bf16 band), as test_parity.py asks of the CPU."""
    cuda_eng, cpu_eng = pair(model, "bfloat16")
    r = ref(model)
    out = greedy(cuda_eng, r["prompt"], 8, logprobs=True)
    assert len(out.token_ids) == 8 and all(np.isfinite(out.logprobs))
    full = cuda_eng.forward(r["prompt"] + out.token_ids)
    p = len(r["prompt"])
    tol = REDUCED_TOL["bfloat16"] * scale_of(full)
    for i, tok in enumerate(out.token_ids):
        row = full[p - 1 + i]
        assert row[tok] >= row.max() - tol, (
            f"{model} bf16 step {i}: token {tok} ({row[tok]:.4f}) vs max {row.max():.4f}"
        )


@params("model", MODELS)
def test_greedy_f32(model):
    cuda_eng, cpu_eng = pair(model)
    r = ref(model)
    a = greedy(cuda_eng, r["prompt"], 16, logprobs=True)
    b = greedy(cpu_eng, r["prompt"], 16, logprobs=True)
    assert_same_tokens(a.token_ids, b.token_ids, cpu_eng, r["prompt"], f"{model} f32 greedy")
    assert a.token_ids == r["greedy"][:16], f"{model}: CUDA greedy {a.token_ids} != HF {r['greedy'][:16]}"
    assert a.finish_reason == b.finish_reason == "length"
    assert a.text == b.text
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=LOGPROB_TOL, rtol=0, err_msg=f"{model} logprobs")
    assert a.ffn_active == b.ffn_active


@params("model", MODELS)
def test_long_decode_f32(model):
    """48 tokens after a 150-token prompt: decode attention over up to ~200 cached positions."""
    cuda_eng, cpu_eng = pair(model)
    r = ref(model)
    prompt = (r["prompt"] * 4)[:150]
    a = greedy(cuda_eng, prompt, 48)
    b = greedy(cpu_eng, prompt, 48)
    assert_same_tokens(a.token_ids, b.token_ids, cpu_eng, prompt, f"{model} f32 greedy, long context")


# Per-token gating with the CPU's calibration on both sides (each engine calibrates on its own
# otherwise): CATS (every neuron a candidate) and the hybrid (the gate inside TDA's kept set).
GATED = {"cats-thresholds": "cats:0.5", "hybrid-thresholds": "hybrid:0.8,0.5"}


def _sparsity(spec: str, cpu_eng):
    from tda_engine import Sparsity

    if spec == "tda-thresholds":  # explicit thresholds (the CPU's calibration), the same on both sides
        return Sparsity.tda(thresholds=cpu_eng.default_thresholds(0.5))
    if spec in GATED:
        return Sparsity.tda(thresholds=cpu_eng.resolved_thresholds(GATED[spec]))
    return spec


@params("spec", ["griffin:0.5", "tda:0.5", "tda-thresholds", *GATED])
@params("model", MODELS)
def test_sparse_decode_f32(model, spec):
    """The prompt chooses the kept neurons on each device; the same mask and the same tokens. Gated
    specs: the gate passes the same neurons, so the FFN bytes read agree too (a neuron within
    rounding of its threshold may go either way: a tolerance of a small fraction)."""
    cuda_eng, cpu_eng = pair(model)
    r = ref(model)
    sp = _sparsity(spec, cpu_eng)
    kept_cuda = cuda_eng.select_neurons(r["prompt"], sp)
    kept_cpu = cpu_eng.select_neurons(r["prompt"], sp)
    for layer, (a, b) in enumerate(zip(kept_cuda, kept_cpu, strict=True)):
        a, b = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
        assert a == b, (
            f"{model} {spec}: layer {layer} keeps {len(a)} neurons on CUDA, {len(b)} on the CPU; "
            f"only CUDA {sorted(a - b)[:10]}, only CPU {sorted(b - a)[:10]}"
        )
    a = greedy(cuda_eng, r["prompt"], 16, sparsity=sp)
    b = greedy(cpu_eng, r["prompt"], 16, sparsity=sp)
    assert a.ffn_active == b.ffn_active, f"{model} {spec}: ffn_active cuda {a.ffn_active} cpu {b.ffn_active}"
    assert abs(a.ffn_bytes - b.ffn_bytes) <= 1e-3, f"{model} {spec}: ffn_bytes cuda {a.ffn_bytes} cpu {b.ffn_bytes}"
    if spec in GATED:
        assert a.ffn_bytes < 1.0, f"{model} {spec}: the gate skipped nothing (ffn_bytes {a.ffn_bytes})"
    assert_same_tokens(a.token_ids, b.token_ids, cpu_eng, r["prompt"], f"{model} {spec} decode")


@params("spec", ["dense", "griffin:0.5", "tda:0.5", *GATED])
@params("model", MODELS)
def test_score_f32(model, spec):
    cuda_eng, cpu_eng = pair(model)
    r = ref(model)
    ids = r["prompt"] + r["greedy"]
    p = len(r["prompt"])
    sp = _sparsity(spec, cpu_eng)
    a, bytes_a = cuda_eng.score(ids, p, sp, return_ffn_bytes=True)
    b, bytes_b = cpu_eng.score(ids, p, sp, return_ffn_bytes=True)
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape == (len(ids) - p,), (a.shape, b.shape)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=LOGPROB_TOL, rtol=0, err_msg=f"{model} score {spec}")
    # The many-row pass gates each row as decoding does, and counts what passed (as in decode).
    assert abs(bytes_a - bytes_b) <= 1e-3, f"{model} score {spec}: ffn_bytes cuda {bytes_a} cpu {bytes_b}"


@params("model", MODELS)
def test_calibrate_density_f32(model):
    cuda_eng, cpu_eng = pair(model)
    kw = dict(density=0.5, lengths=[16, 64], max_windows=2)
    a = cuda_eng.calibrate(None, **kw)
    b = cpu_eng.calibrate(None, **kw)
    assert a.prompt_lengths == b.prompt_lengths and a.num_layers == b.num_layers
    np.testing.assert_allclose(a.values, b.values, rtol=THRESHOLD_RTOL, atol=1e-7, err_msg=f"{model} calibrate")
    da, db = cuda_eng.default_thresholds(0.5), cpu_eng.default_thresholds(0.5)
    np.testing.assert_allclose(
        da.values, db.values, rtol=THRESHOLD_RTOL, atol=1e-7, err_msg=f"{model} default thresholds"
    )


def test_calibrate_quality_budget_runs():
    """The perplexity-budget search runs on the device and gives one threshold per layer."""
    cuda_eng, _ = pair(PROBE)
    th = cuda_eng.calibrate(None, max_ppl_increase=0.05, max_windows=2)
    assert th.num_layers == cuda_eng.model_info["num_layers"]
    assert all(np.isfinite(v) and v >= 0 for row in th.values for v in row)
    assert th.report is not None


@params("model", MODELS)
def test_stream_and_chat(model):
    cuda_eng, cpu_eng = pair(model)
    r = ref(model)
    st = cuda_eng.stream(r["prompt"], max_new_tokens=12, temperature=0, ignore_eos=True)
    text = "".join(st)
    b = greedy(cpu_eng, r["prompt"], 12)
    assert st.result is not None
    assert st.result.token_ids == b.token_ids, f"{model} stream: {st.result.token_ids} != cpu {b.token_ids}"
    assert text == b.text
    msgs = r["json"]["chat_messages"]
    a = cuda_eng.chat(msgs, max_new_tokens=8, temperature=0)
    c = cpu_eng.chat(msgs, max_new_tokens=8, temperature=0)
    assert a.token_ids == c.token_ids and a.text == c.text and a.finish_reason == c.finish_reason
    sc = cuda_eng.stream_chat(msgs, max_new_tokens=8, temperature=0)
    assert "".join(sc) == c.text


def test_sampling_seeded_matches_cpu():
    """Seeded sampling draws the same tokens (the device may sample itself: same rule, same u)."""
    cuda_eng, cpu_eng = pair(PROBE)
    r = ref(PROBE)
    kw = dict(max_new_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = cuda_eng.generate(r["prompt"], **kw)
    b = cpu_eng.generate(r["prompt"], **kw)
    assert_same_tokens(a.token_ids, b.token_ids, cpu_eng, r["prompt"], "seeded sampling")


def test_threads_share_one_cuda_engine():
    """Several threads generating on one CUDA engine each get the single-thread answer."""
    cuda_eng, cpu_eng = pair(PROBE)
    r = ref(PROBE)
    prompts = [r["prompt"], r["prompt"][:20], (r["prompt"] * 3)[:100], r["prompt"][5:]]
    want = [greedy(cpu_eng, p, 12).token_ids for p in prompts]

    def job(i):
        return greedy(cuda_eng, prompts[i % 4], 12).token_ids

    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(job, range(12)))
    for i, g in enumerate(got):
        assert g == want[i % 4], f"thread job {i}: {g} != {want[i % 4]}"


# ----------------------------------------------------------------------------------------------
# With a GPU: allocations that cannot succeed

_OOM_CHILD = textwrap.dedent(
    """
    import json, subprocess, sys
    from tda_engine import Engine

    path, prompt, n, huge = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def gpu_mib():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=20).stdout
            return int(out.strip().splitlines()[0])
        except Exception:
            return None

    res = {"attempts": []}
    eng = Engine.from_pretrained(path, device="cuda")
    res["device"] = eng.model_info["device"]
    res["before"] = eng.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids
    res["mib_before"] = gpu_mib()
    for _ in range(2):
        try:
            st = eng.stream(prompt, max_new_tokens=huge, temperature=0, ignore_eos=True)
            next(iter(st), None)
            st.close()
            res["attempts"].append({"type": None})
        except BaseException as e:
            res["attempts"].append({"type": type(e).__name__, "module": type(e).__module__, "msg": str(e)[:400]})
    res["after"] = eng.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids
    res["mib_after"] = gpu_mib()
    print("RESULT " + json.dumps(res))
    """
)


def test_impossible_kv_cache_is_memory_error_and_engine_survives():
    """A model that declares a 2^28-token context, asked for that many tokens: the KV cache cannot
    fit on the device, which must raise MemoryError (or ValueError) without leaking device memory,
    and the engine must keep working. Runs in a child process, so that a crash (an allocation that
    aborts, a host-side table for 2^28 positions) fails this test alone."""
    need_cuda()
    _, cpu_eng = pair(PROBE)
    r = ref(PROBE)
    want = greedy(cpu_eng, r["prompt"], 8).token_ids
    tmp = Path(tempfile.mkdtemp(prefix="tda-oom-"))
    try:
        d = tmp / PROBE
        shutil.copytree(model_dir(PROBE), d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["max_position_embeddings"] = HUGE_CONTEXT + 64
        (d / "config.json").write_text(json.dumps(cfg))
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _OOM_CHILD, str(d), json.dumps(r["prompt"]), "8", str(HUGE_CONTEXT)],
                capture_output=True,
                text=True,
                timeout=OOM_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"the impossible allocation did not return within {OOM_TIMEOUT_S} s (a host-side table sized by the "
                f"context?); output: {(e.stdout or '')[-800:]!s} {(e.stderr or '')[-800:]!s}"
            ) from None
        took = time.monotonic() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, (
        f"child exited {proc.returncode} after {took:.1f} s; "
        f"stdout {proc.stdout[-800:]!r}; stderr {proc.stderr[-1500:]!r}"
    )
    res = json.loads(line[len("RESULT ") :])
    assert res["before"] == want, (
        f"the CUDA engine disagrees with the CPU before the attempt: {res['before']} vs {want}"
    )
    for i, att in enumerate(res["attempts"]):
        assert att["type"] in ("MemoryError", "ValueError"), (
            f"attempt {i}: expected MemoryError or ValueError, got {att}"
        )
    assert res["after"] == want, f"after the failed allocations the engine gives {res['after']}, expected {want}"
    if res.get("mib_before") is not None and res.get("mib_after") is not None:
        grew = res["mib_after"] - res["mib_before"]
        assert grew < 2048, f"device memory grew by {grew} MiB across the failed allocations (leak?): {res}"


# ----------------------------------------------------------------------------------------------
# Standalone runner: python tests/test_cuda.py [-k SUBSTRING] [-x]


def _cases():
    for name, fn in sorted(globals().items()):
        if not (name.startswith("test_") and callable(fn)):
            continue
        grid = getattr(fn, "_params", [])
        if not grid:
            yield name, fn, {}
            continue
        names = [g[0] for g in grid]
        for combo in itertools.product(*[g[1] for g in grid]):
            kw = dict(zip(names, combo, strict=True))
            yield f"{name}[{'-'.join(str(v) for v in combo)}]", fn, kw


def _main(argv: list[str]) -> int:
    sel = argv[argv.index("-k") + 1] if "-k" in argv else None
    first_fail = "-x" in argv
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    skips: dict[str, int] = {}
    t0 = time.monotonic()
    for name, fn, kw in _cases():
        if sel and sel not in name:
            continue
        t = time.monotonic()
        try:
            fn(**kw)
        except Skipped as e:
            counts["skipped"] += 1
            skips[str(e)] = skips.get(str(e), 0) + 1
            continue
        except BaseException as e:  # noqa: B036 - report everything, go on
            counts["failed"] += 1
            failures.append((name, e))
            print(f"FAILED {name} ({time.monotonic() - t:.1f}s): {type(e).__name__}: {str(e)[:600]}", flush=True)
            if os.environ.get("TDA_TEST_TRACEBACK"):
                traceback.print_exception(e)
            if first_fail:
                break
            continue
        counts["passed"] += 1
        print(f"PASSED {name} ({time.monotonic() - t:.1f}s)", flush=True)
    for reason, n in skips.items():
        print(f"SKIPPED [{n}] {reason}")
    took = time.monotonic() - t0
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped in {took:.1f}s")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
