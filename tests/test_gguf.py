"""GGUF loading: every common quant type decodes to the reference dequantization (the `gguf`
package), llama.cpp's q/k permutation is undone, the tokenizer comes from the metadata, and broken
files give clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ref_for
from gguf_build import QUANT_TYPES, build_pair, set_tensor_type
from tda_engine import Engine


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {q: build_pair(out, q, seed=i) for i, q in enumerate(QUANT_TYPES)}


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_gguf_equals_its_dequantized_hf_twin(pairs, qtype):
    """dtype="float32" dequantizes every tensor at load (the quantized path: test_quantized.py)."""
    gguf_path, hf_dir = pairs[qtype]
    a = Engine.from_pretrained(gguf_path, dtype="float32")
    b = Engine.from_pretrained(hf_dir)
    info = a.model_info
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["num_layers"] == 2 and info["hidden_size"] == 256 and info["num_key_value_heads"] == 2
    ids = ref_for("llama2").prompt_ids
    la, lb = a.forward(ids), b.forward(ids)
    scale = np.abs(lb).max()
    assert scale > 1.0, "the test model should produce non-trivial logits"
    assert np.abs(la - lb).max() <= 1e-5 * scale, qtype
    ga = a.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids
    assert ga == b.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids


def test_gguf_tokenizer_and_chat_template_match_the_source_tokenizer(pairs):
    gguf_path, hf_dir = pairs["F32"]
    a, b = Engine.from_pretrained(gguf_path), Engine.from_pretrained(hf_dir)
    r = ref_for("llama2")
    for text, ids in zip(r["texts"], r["text_ids"], strict=True):
        assert a.tokenize(text) == ids
        assert a.detokenize(ids, skip_special_tokens=True) == b.detokenize(ids, skip_special_tokens=True)
    msgs = r["chat_messages"]
    assert a.apply_chat_template(msgs) == b.apply_chat_template(msgs)
    assert a.eos_token_ids == b.eos_token_ids


def test_gguf_in_a_directory_loads(pairs, tmp_path):
    gguf_path, _ = pairs["Q8_0"]
    d = tmp_path / "only-gguf"
    d.mkdir()
    (d / gguf_path.name).write_bytes(gguf_path.read_bytes())
    assert (
        Engine.from_pretrained(d).model_info["vocab_size"] == Engine.from_pretrained(gguf_path).model_info["vocab_size"]
    )


def _raises_value_error(path, *needles):
    with pytest.raises(ValueError) as info:
        Engine.from_pretrained(path)
    assert type(info.value) is ValueError
    msg = str(info.value)
    for n in needles:
        assert n in msg, msg


def test_truncated_gguf(pairs, tmp_path):
    src, _ = pairs["Q8_0"]
    data = src.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 100):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        _raises_value_error(p, str(p))


def test_bad_magic(pairs, tmp_path):
    src, _ = pairs["F16"]
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUX" + src.read_bytes()[4:])
    _raises_value_error(p, "not a GGUF file", str(p))


def test_unknown_quant_type(pairs, tmp_path):
    src, _ = pairs["F32"]
    p = tmp_path / "unknown-type.gguf"
    p.write_bytes(src.read_bytes())
    set_tensor_type(p, "output_norm.weight", 99)
    _raises_value_error(p, "99", str(p))


@pytest.mark.parametrize("key", ["llama.embedding_length", "llama.block_count", "tokenizer.ggml.tokens"])
def test_missing_metadata_key(tmp_path, key):
    path, _ = build_pair(tmp_path, "F32", skip_keys=(key,))
    _raises_value_error(path, key)


@pytest.mark.parametrize(
    "key", ["llama.block_count", "llama.embedding_length", "llama.attention.head_count", "llama.context_length"]
)
def test_absurd_gguf_header_counts_fail_fast(tmp_path, key):
    import time

    path, _ = build_pair(tmp_path, "F32", overrides={key: 4_000_000_000})
    t = time.perf_counter()
    _raises_value_error(path, key, "4000000000")
    assert time.perf_counter() - t < 10


def test_gguf_with_more_layers_than_tensors_fails_fast(tmp_path):
    path, _ = build_pair(tmp_path, "F32", overrides={"llama.block_count": 3000})
    _raises_value_error(path, "num_hidden_layers", "3000", "layers.2999")


def test_engine_usable_after_gguf_errors(pairs, tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(ValueError):
        Engine.from_pretrained(p)
    gguf_path, _ = pairs["Q4_0"]
    assert len(Engine.from_pretrained(gguf_path).generate("Hello", max_new_tokens=3, ignore_eos=True).token_ids) == 3


def test_convert_writes_an_equivalent_hf_directory(pairs, tmp_path):
    import json

    from tda_engine import convert_gguf

    gguf_path, _ = pairs["Q4_K"]
    out = tmp_path / "converted"
    convert_gguf(gguf_path, out)
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    a, b = Engine.from_pretrained(gguf_path), Engine.from_pretrained(out)
    ids = ref_for("llama2").prompt_ids
    assert np.abs(a.forward(ids) - b.forward(ids)).max() <= 1e-5 * np.abs(a.forward(ids)).max()
    assert a.tokenize("Hello world, 123!") == b.tokenize("Hello world, 123!")
    assert a.apply_chat_template(ref_for("llama2")["chat_messages"]) == b.apply_chat_template(
        ref_for("llama2")["chat_messages"]
    )
