"""Quantized weights kept in their blocks (dtype="auto" on GGUF files, or a block type at load).

The reference is the engine's own dequantized float32 path on the same file (itself checked against
the `gguf` package's dequantization and HF transformers in test_gguf.py and test_real_models.py).

Tolerances, and where they come from:

- **Prefill** (many rows) multiplies dequantized tiles in float32: the same numbers as the float32
  path, to float rounding (1e-5 of the logit scale).
- **Decode** (one row) quantizes each product's input to 8 bits per block of 32 (Q8_0/Q8_1) or 256
  (Q8_K) values, as llama.cpp does, and multiplies integers. Each activation moves by at most
  about half a step, `max|x| / 254`, of its block; the kernels' unit tests bound every product by
  that (kernels::cpu tests, `quantization_bound`). Through the fixtures' two layers this moves the
  log-probabilities of greedy tokens by at most 0.09 nats (0.03 on average) on every block type;
  the test allows 0.15 (mean 0.05). A float32 GEMV in place of the integer one would give 1e-5.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ref_for
from tda_engine import Engine, Sparsity

sys.path.insert(0, str(Path(__file__).parent))
from gguf_build import QUANT_TYPES, build_pair  # noqa: E402

BLOCK_TYPES = [q for q in QUANT_TYPES if q.startswith("Q")]
DECODE_MAX, DECODE_MEAN = 0.15, 0.05


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized")
    return {q: build_pair(out, q, seed=i, realistic_k=True)[0] for i, q in enumerate(BLOCK_TYPES)}


def _pair(files, qtype):
    path = files[qtype]
    return Engine.from_pretrained(path), Engine.from_pretrained(path, dtype="float32")


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_quantized_path_matches_the_dequantized_float32_path(files, qtype):
    q, f = _pair(files, qtype)
    # The blocks stay as stored: the file's type (and Q8_0 for the sparse FFN's requantized Wd^T).
    types = q.model_info["weight_types"]
    assert qtype.lower() in types and "float32" not in types, types
    assert set(f.model_info["weight_types"]) == {"float32"}
    assert q.model_info["dtype"] == "auto" and f.model_info["dtype"] == "float32"
    assert q.model_info["decode_weight_bytes"] < f.model_info["decode_weight_bytes"] / 2
    ids = ref_for("llama2").prompt_ids
    lq, lf = q.forward(ids), f.forward(ids)
    assert np.abs(lq - lf).max() <= 1e-5 * np.abs(lf).max()
    out = q.generate(ids, max_new_tokens=16, temperature=0, ignore_eos=True, logprobs=True)
    want = f.score(ids + out.token_ids, len(ids))
    d = np.abs(np.asarray(out.logprobs) - want)
    assert d.max() <= DECODE_MAX and d.mean() <= DECODE_MEAN, (d.max(), d.mean())
    # and the integer path is really taken: one row through it differs from float32 beyond rounding
    assert np.abs(q.forward(ids[:1]) - f.forward(ids[:1])).max() > 1e-4


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("spec", ["griffin:0.5", "tda:0.5"])
def test_sparse_decode_on_quantized_weights_equals_forward_with_zeroed_neurons(files, qtype, spec):
    """Sparse decode (kept rows of the blocks, Wd^T requantized to Q8_0) against score(): the same
    weights over many rows, the skipped neurons' activations zeroed, in float32."""
    eng = Engine.from_pretrained(files[qtype])
    ids = ref_for("llama2").prompt_ids
    sp = Sparsity.parse(spec)
    out = eng.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=True, sparsity=sp)
    want = eng.score(ids + out.token_ids, len(ids), sp)
    d = np.abs(np.asarray(out.logprobs) - want)
    assert d.max() <= DECODE_MAX and d.mean() <= DECODE_MEAN, (d.max(), d.mean())
    n = eng.model_info["intermediate_size"]
    assert all(0 < k < n for k in out.ffn_active), out.ffn_active
    # the masks matter: the dense continuation's log-probs differ
    dense = eng.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=True)
    assert dense.logprobs[0] == out.logprobs[0]
    assert dense.token_ids != out.token_ids or np.abs(np.subtract(dense.logprobs, out.logprobs)).max() > 1e-3


def test_all_kept_on_quantized_weights_equals_dense_exactly(files):
    eng = Engine.from_pretrained(files["Q4_1"])
    ids = ref_for("llama2").prompt_ids
    dense = eng.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=True)
    for sp in (Sparsity.griffin(1.0), Sparsity.tda(thresholds=0.0)):
        out = eng.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=True, sparsity=sp)
        assert out.token_ids == dense.token_ids and out.logprobs == dense.logprobs


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_hf_checkpoint_quantized_at_load_equals_the_gguf_packages_quantization(dtype, tmp_path):
    """dtype="q8_0" / "q4_0" quantizes an HF checkpoint's matrices at load with ggml's rounding: the
    prefill (float32 math on the dequantized blocks) equals the float32 engine on a copy of the
    checkpoint whose matrices went through the `gguf` package's quantize and dequantize."""
    import shutil

    import gguf
    from conftest import model_dir
    from safetensors.numpy import load_file, save_file

    src = model_dir("llama2")
    qt = getattr(gguf.GGMLQuantizationType, dtype.upper())
    twin = tmp_path / "twin"
    shutil.copytree(src, twin)
    tensors = load_file(str(twin / "model.safetensors"))
    for name, w in tensors.items():
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            tensors[name] = gguf.quants.dequantize(gguf.quants.quantize(w.astype(np.float32), qt), qt).reshape(w.shape)
    save_file(tensors, str(twin / "model.safetensors"))
    q, ref = Engine.from_pretrained(src, dtype=dtype), Engine.from_pretrained(twin, dtype="float32")
    assert q.model_info["dtype"] == dtype and dtype in q.model_info["weight_types"]
    ids = ref_for("llama2").prompt_ids
    lq, lr = q.forward(ids), ref.forward(ids)
    assert np.abs(lq - lr).max() <= 1e-5 * np.abs(lr).max()
    # and the weights really changed: the original checkpoint gives other logits
    assert np.abs(Engine.from_pretrained(src, dtype="float32").forward(ids) - lq).max() > 1e-3


def test_bad_dtype_names_the_value():
    from conftest import model_dir

    with pytest.raises(ValueError, match="q3_x"):
        Engine.from_pretrained(model_dir("llama2"), dtype="q3_x")
