"""Builds small GGUF files for tests, each paired with the HF directory it must equal.

A random Llama-shaped model is written twice: as a GGUF file the way llama.cpp's converter writes
it (q/k rows permuted for llama.cpp's rope, weights quantized to a chosen type, no tokenizer.json:
the tokenizer lives in the metadata), and as an HF directory whose safetensors hold exactly the
weights the GGUF file decodes to (dequantized with the `gguf` package, the reference
implementation of the formats, then un-permuted). An engine that reads GGUF correctly gives the
same logits from both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

FIXTURES = Path(__file__).parent / "fixtures" / "models"
TOKENIZER_SOURCE = FIXTURES / "llama2"

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, MAX_POS = 256, 512, 2, 4, 2, 256
HEAD_DIM = HIDDEN // HEADS

QUANT_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]

# Byte offsets of the f16 scale fields inside one 256-value block of each K-quant type
# (ggml-common.h); random blocks get small finite scales there.
_K_SCALE_FIELDS = {
    "Q2_K": [80, 82],  # scales[16], qs[64], d, dmin
    "Q3_K": [108],  # hmask[32], qs[64], scales[12], d
    "Q4_K": [0, 2],  # d, dmin, scales[12], qs[128]
    "Q5_K": [0, 2],  # d, dmin, scales[12], qh[32], qs[128]
    "Q6_K": [208],  # ql[128], qh[64], scales[16], d
}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# For blocks like trained weights (`realistic_k`): the super-block scale `d` that gives random
# quants and sub-block scales a standard deviation near 0.05 (the other matrices' 0.05 normal), and
# `dmin / d`, which centres them on zero. From the formats' value ranges: Q6_K d*sc*(q-32) with i8 sc;
# Q4_K/Q5_K d*sc*q - dmin*m with 6-bit sc, m; Q2_K the same with 4-bit sc, m and 2-bit q; Q3_K
# d*(sc-32)*q with signed 3-bit q.
_K_REALISTIC = {
    "Q2_K": (3.6e-3, 1.5),
    "Q3_K": (1.2e-3, 0.0),
    "Q4_K": (2e-4, 7.5),
    "Q5_K": (1e-4, 15.5),
    "Q6_K": (3.7e-5, 0.0),
}


def _encode(
    w: np.ndarray, qtype: str, rng: np.random.Generator, realistic_k: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF data, what it decodes to) for a 2-D float32 matrix. K-quant types (which the
    `gguf` package cannot quantize) get random blocks: random small scales, or with `realistic_k`
    scales that make weights of the matrices' usual size."""
    t = Q[qtype]
    if qtype == "F32":
        return w, w
    if qtype in _K_SCALE_FIELDS:
        block, size = gguf.GGML_QUANT_SIZES[t]
        rows, cols = w.shape
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        if realistic_k:
            typical, ratio = _K_REALISTIC[qtype]
            d = rng.uniform(0.8, 1.2, size=raw.shape[:2]) * typical
            scales = [d, d * ratio][: len(_K_SCALE_FIELDS[qtype])]
        else:
            scales = [rng.uniform(0.0005, 0.004, size=raw.shape[:2]) for _ in _K_SCALE_FIELDS[qtype]]
        for off, scale in zip(_K_SCALE_FIELDS[qtype], scales, strict=True):
            raw[:, :, off : off + 2] = scale.astype(np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
        raw = raw.reshape(rows, -1)
    else:
        raw = gguf.quants.quantize(w, t)
    return raw, gguf.quants.dequantize(raw, t).astype(np.float32).reshape(w.shape)


def _tokenizer_metadata() -> dict:
    tok = json.loads((TOKENIZER_SOURCE / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {a["id"] for a in tok["added_tokens"] if a.get("special")}
    types = [3 if i in special else 1 for i in range(len(tokens))]
    cfg = json.loads((TOKENIZER_SOURCE / "tokenizer_config.json").read_text())
    return {
        "tokens": tokens,
        "merges": merges,
        "types": types,
        "bos": vocab[cfg["bos_token"] if isinstance(cfg["bos_token"], str) else cfg["bos_token"]["content"]],
        "eos": vocab[cfg["eos_token"] if isinstance(cfg["eos_token"], str) else cfg["eos_token"]["content"]],
        "chat_template": cfg.get("chat_template"),
    }


def build_pair(
    out: Path,
    qtype: str,
    seed: int = 0,
    skip_keys: tuple[str, ...] = (),
    overrides: dict | None = None,
    realistic_k: bool = False,
) -> tuple[Path, Path]:
    """Writes `out/model-<qtype>.gguf` and the equivalent HF directory `out/hf-<qtype>/`; `overrides`
    replaces the values of GGUF metadata keys (for corrupt-header tests); `realistic_k` gives K-quant
    blocks scales like trained weights' (see `_encode`)."""
    rng = np.random.default_rng(seed)
    tk = _tokenizer_metadata()
    vocab = len(tk["tokens"])

    def normal(*shape, std=0.05):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    hf: dict[str, np.ndarray] = {}
    tensors: list[tuple[str, np.ndarray, str]] = []  # GGUF name, raw data, type

    def matrix(hf_name: str, gguf_name: str, w: np.ndarray, heads: int | None = None):
        stored = permute(w, heads) if heads else w
        raw, decoded = _encode(stored, qtype, rng, realistic_k)
        tensors.append((gguf_name, raw, qtype))
        hf[hf_name] = unpermute(decoded, heads) if heads else decoded

    def vector(hf_name: str, gguf_name: str, v: np.ndarray):
        tensors.append((gguf_name, v, "F32"))
        hf[hf_name] = v

    matrix("model.embed_tokens.weight", "token_embd.weight", normal(vocab, HIDDEN, std=0.5))
    for i in range(LAYERS):
        p, b = f"model.layers.{i}", f"blk.{i}"
        matrix(f"{p}.self_attn.q_proj.weight", f"{b}.attn_q.weight", normal(HEADS * HEAD_DIM, HIDDEN), HEADS)
        matrix(f"{p}.self_attn.k_proj.weight", f"{b}.attn_k.weight", normal(KV_HEADS * HEAD_DIM, HIDDEN), KV_HEADS)
        matrix(f"{p}.self_attn.v_proj.weight", f"{b}.attn_v.weight", normal(KV_HEADS * HEAD_DIM, HIDDEN))
        matrix(f"{p}.self_attn.o_proj.weight", f"{b}.attn_output.weight", normal(HIDDEN, HEADS * HEAD_DIM))
        matrix(f"{p}.mlp.gate_proj.weight", f"{b}.ffn_gate.weight", normal(INTER, HIDDEN))
        matrix(f"{p}.mlp.up_proj.weight", f"{b}.ffn_up.weight", normal(INTER, HIDDEN))
        matrix(f"{p}.mlp.down_proj.weight", f"{b}.ffn_down.weight", normal(HIDDEN, INTER))
        vector(f"{p}.input_layernorm.weight", f"{b}.attn_norm.weight", 1.0 + normal(HIDDEN, std=0.1))
        vector(f"{p}.post_attention_layernorm.weight", f"{b}.ffn_norm.weight", 1.0 + normal(HIDDEN, std=0.1))
    vector("model.norm.weight", "output_norm.weight", 1.0 + normal(HIDDEN, std=0.1))
    matrix("lm_head.weight", "output.weight", normal(vocab, HIDDEN, std=0.2))

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"model-{qtype}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    meta = [
        ("llama.context_length", w.add_uint32, MAX_POS),
        ("llama.embedding_length", w.add_uint32, HIDDEN),
        ("llama.block_count", w.add_uint32, LAYERS),
        ("llama.feed_forward_length", w.add_uint32, INTER),
        ("llama.attention.head_count", w.add_uint32, HEADS),
        ("llama.attention.head_count_kv", w.add_uint32, KV_HEADS),
        ("llama.attention.layer_norm_rms_epsilon", w.add_float32, 1e-5),
        ("llama.rope.freq_base", w.add_float32, 10000.0),
        ("tokenizer.ggml.model", w.add_string, "gpt2"),
        ("tokenizer.ggml.pre", w.add_string, "default"),
        ("tokenizer.ggml.tokens", w.add_array, tk["tokens"]),
        ("tokenizer.ggml.merges", w.add_array, tk["merges"]),
        ("tokenizer.ggml.token_type", w.add_array, tk["types"]),
        ("tokenizer.ggml.bos_token_id", w.add_uint32, tk["bos"]),
        ("tokenizer.ggml.eos_token_id", w.add_uint32, tk["eos"]),
        ("tokenizer.ggml.add_bos_token", w.add_bool, True),
        ("tokenizer.chat_template", w.add_string, tk["chat_template"]),
    ]
    for key, add, value in meta:
        if key not in skip_keys:
            add(key, (overrides or {}).get(key, value))
    for name, raw, t in tensors:
        w.add_tensor(name, raw, raw_dtype=Q[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    hf_dir = out / f"hf-{qtype}"
    hf_dir.mkdir(exist_ok=True)
    save_file(hf, str(hf_dir / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": vocab,
        "max_position_embeddings": MAX_POS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": tk["bos"],
        "eos_token_id": tk["eos"],
    }
    (hf_dir / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_SOURCE / f, hf_dir / f)
    return path, hf_dir


def set_tensor_type(path: Path, tensor: str, type_id: int) -> None:
    """Overwrites the ggml type of `tensor` in a GGUF file's tensor directory."""
    data = bytearray(path.read_bytes())
    name = tensor.encode()
    i = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[i : i + 4], "little")
    at = i + 4 + 8 * n_dims
    data[at : at + 4] = type_id.to_bytes(4, "little")
    path.write_bytes(bytes(data))
