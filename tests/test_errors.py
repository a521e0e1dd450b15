"""Bad input gives the documented Python exception, naming the bad value, and never a Rust panic.

Exception types are checked exactly (a pyo3 PanicException derives from BaseException and would
not be caught by pytest.raises(ValueError) either), and after every error on a loaded engine the
engine must still reproduce the reference greedy tokens.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from conftest import MODELS, assert_engine_ok, copy_model, model_dir, ref_for

# A single-file model and a sharded one.
SINGLE = "llama2"
SHARDED = "llama3"


def check_raises(exc_type, fn, *needles):
    """fn() raises exactly exc_type (or an engine-defined subclass) whose message names all needles."""
    with pytest.raises(BaseException) as info:
        fn()
    e = info.value
    t = type(e)
    ok = t is exc_type or (issubclass(t, exc_type) and t.__module__.split(".")[0] == "tda_engine")
    assert ok, f"expected {exc_type.__name__}, got {t.__module__}.{t.__name__}: {e}"
    msg = str(e)
    for n in needles:
        alts = n if isinstance(n, tuple) else (n,)
        assert any(str(a).lower() in msg.lower() for a in alts), f"message {msg!r} does not name {alts}"
    return e


def _load(path, **kw):
    from tda_engine import Engine

    return Engine.from_pretrained(str(path), **kw)


# --------------------------------------------------------------------------- safetensors by hand


def read_safetensors(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        tensors[name] = (info["dtype"], list(info["shape"]), data[a:b])
    return tensors, meta


def write_safetensors(path: Path, tensors, meta=None):
    header = {}
    if meta is not None:
        header["__metadata__"] = meta
    offset = 0
    blobs = []
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _weight_files(d: Path):
    files = sorted(d.glob("*.safetensors"))
    assert files, f"no safetensors in {d}"
    return files


def _file_with(d: Path, tensor: str) -> Path:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        return d / json.loads(idx.read_text())["weight_map"][tensor]
    return _weight_files(d)[0]


def _a_layer_tensor(d: Path, suffix: str = "mlp.up_proj.weight") -> str:
    for f in _weight_files(d):
        for name in read_safetensors(f)[0]:
            if name.endswith(suffix) and ".layers.0." in name:
                return name
    pytest.fail(f"no tensor *{suffix} in {d}")


# --------------------------------------------------------------------------- loading


def test_missing_path(tmp_path):
    p = tmp_path / "does-not-exist"
    check_raises(FileNotFoundError, lambda: _load(p), "does-not-exist")


def test_missing_config(tmp_path):
    d = copy_model(SINGLE, tmp_path / "m")
    (d / "config.json").unlink()
    check_raises(FileNotFoundError, lambda: _load(d), "config.json")


def test_missing_shard(tmp_path):
    d = copy_model(SHARDED, tmp_path / "m")
    assert (d / "model.safetensors.index.json").exists(), f"{SHARDED} should be sharded"
    victim = _weight_files(d)[-1]
    victim.unlink()
    check_raises(FileNotFoundError, lambda: _load(d), victim.name)


@pytest.mark.parametrize("name", [SINGLE, SHARDED])
def test_truncated_safetensors(tmp_path, name):
    d = copy_model(name, tmp_path / "m")
    f = _weight_files(d)[0]
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) * 2 // 3])
    check_raises(ValueError, lambda: _load(d), f.name)


@pytest.mark.parametrize(
    "garbage",
    [b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", b"abc"],
    ids=["all-0xff", "bad-json-header", "3-bytes"],
)
def test_garbage_safetensors(tmp_path, garbage):
    d = copy_model(SINGLE, tmp_path / "m")
    f = _weight_files(d)[0]
    f.write_bytes(garbage)
    check_raises(ValueError, lambda: _load(d), f.name)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "num_attention_heads"])
def test_config_missing_field(tmp_path, field):
    d = copy_model(SINGLE, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    tc = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    del tc[field]
    (d / "config.json").write_text(json.dumps(cfg))
    check_raises(ValueError, lambda: _load(d), field)


# Counts far beyond any model: refused when the config is read, before anything is sized by them.
ABSURD = {
    "num_hidden_layers": 10**9,
    "hidden_size": 10**9,
    "intermediate_size": 10**12,
    "num_attention_heads": 10**9,
    "num_key_value_heads": 10**9,
    "head_dim": 10**9,
    "vocab_size": 10**12,
    "max_position_embeddings": 10**12,
}
# Counts a real model could have, but not this checkpoint: refused against the file's tensors,
# before the weights they size are read.
WRONG_FOR_THE_FILE = {
    "num_hidden_layers": 4000,
    "hidden_size": 100_000,
    "intermediate_size": 1_000_000,
    "vocab_size": 4_000_000,
    "head_dim": 4000,
}


def _with_config(tmp_path, field, value):
    d = copy_model(SINGLE, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "field, value",
    [*sorted(ABSURD.items()), *sorted(WRONG_FOR_THE_FILE.items())],
    ids=[*(f"absurd-{f}" for f in sorted(ABSURD)), *(f"wrong-for-the-file-{f}" for f in sorted(WRONG_FOR_THE_FILE))],
)
def test_oversized_config_fails_fast_naming_the_field(tmp_path, field, value):
    import time

    d = _with_config(tmp_path, field, value)
    t = time.perf_counter()
    check_raises(ValueError, lambda: _load(d), field, str(value))
    # Before the checks, 10**9 layers kept the loader busy for over 90 s, or ran out of memory.
    assert time.perf_counter() - t < 10


def test_config_not_json(tmp_path):
    d = copy_model(SINGLE, tmp_path / "m")
    (d / "config.json").write_text("{ this is not json")
    check_raises(ValueError, lambda: _load(d), "config.json")


@pytest.mark.parametrize("layout", ["classic", "v5"])
def test_unknown_architecture(tmp_path, layout):
    d = copy_model(SINGLE, tmp_path / "m")
    src = d / ("config.json" if layout == "classic" else "config.v5.json")
    cfg = json.loads(src.read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    e = check_raises(ValueError, lambda: _load(d), "FooForCausalLM")
    # the message lists the supported architectures, at least those of the fixtures
    supported = {ref_for(m)["architecture"] for m in MODELS}
    missing = [a for a in supported if a not in str(e)]
    assert not missing, f"message {str(e)!r} does not list supported architectures {missing}"


def test_tensor_wrong_shape(tmp_path):
    d = copy_model(SINGLE, tmp_path / "m")
    name = _a_layer_tensor(d)
    f = _file_with(d, name)
    tensors, meta = read_safetensors(f)
    dtype, shape, blob = tensors[name]
    assert len(shape) == 2
    row = len(blob) // shape[0]
    tensors[name] = (dtype, [shape[0] - 1, shape[1]], blob[: row * (shape[0] - 1)])
    write_safetensors(f, tensors, meta)
    check_raises(ValueError, lambda: _load(d), name)


def test_tensor_missing(tmp_path):
    d = copy_model(SINGLE, tmp_path / "m")
    name = _a_layer_tensor(d, "self_attn.q_proj.weight")
    f = _file_with(d, name)
    tensors, meta = read_safetensors(f)
    del tensors[name]
    write_safetensors(f, tensors, meta)
    check_raises(ValueError, lambda: _load(d), name)


def test_rewritten_safetensors_still_loads(tmp_path):
    """The hand-written safetensors writer above is sound: an unmodified rewrite loads and works."""
    d = copy_model(SINGLE, tmp_path / "m")
    for f in _weight_files(d):
        tensors, meta = read_safetensors(f)
        write_safetensors(f, tensors, meta)
    eng = _load(d)
    assert_engine_ok(eng, ref_for(SINGLE))


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp32x", ""])
def test_unknown_dtype(dtype):
    needle = dtype if dtype else "dtype"
    check_raises(ValueError, lambda: _load(model_dir(SINGLE), dtype=dtype), needle)


@pytest.mark.parametrize("device", ["tpu", "gpu:7", "quantum"])
def test_unknown_device(device):
    check_raises(ValueError, lambda: _load(model_dir(SINGLE), device=device), device)


# --------------------------------------------------------------------------- bad requests on a loaded engine


@pytest.fixture(scope="module")
def eng(engine_for):
    return engine_for(SINGLE)


@pytest.fixture(scope="module")
def r():
    return ref_for(SINGLE)


@pytest.fixture(autouse=True)
def _engine_still_works(request):
    """After each test that used the loaded engine, it still gives the reference greedy tokens."""
    yield
    if "eng" in request.fixturenames:
        assert_engine_ok(request.getfixturevalue("eng"), ref_for(SINGLE))


@pytest.mark.parametrize("prompt", ["", []], ids=["empty-str", "empty-list"])
def test_empty_prompt(eng, prompt):
    check_raises(ValueError, lambda: eng.generate(prompt, max_new_tokens=2), "prompt")
    check_raises(ValueError, lambda: list(eng.stream(prompt, max_new_tokens=2)), "prompt")
    if isinstance(prompt, list):  # forward() takes ids only
        check_raises(ValueError, lambda: eng.forward(prompt), ("ids", "prompt", "empty"))


def test_empty_prompt_in_batch(eng, r):
    check_raises(ValueError, lambda: eng.generate([r.prompt_ids, []], max_new_tokens=2), "prompt")
    check_raises(ValueError, lambda: eng.generate(["hello", ""], max_new_tokens=2), "prompt")


@pytest.mark.parametrize("bad", ["vocab", "vocab+100", "-1", "2**32"])
def test_token_id_out_of_range(eng, r, bad):
    tok = eval(bad.replace("vocab", str(r.vocab_size)))
    ids = r.prompt_ids[:3] + [tok]
    check_raises(ValueError, lambda: eng.generate(ids, max_new_tokens=2), str(tok))
    check_raises(ValueError, lambda: eng.forward(ids), str(tok))
    check_raises(ValueError, lambda: list(eng.stream(ids, max_new_tokens=2)), str(tok))
    check_raises(ValueError, lambda: eng.detokenize([tok]), str(tok))


def test_prompt_too_long(eng, r):
    max_pos = r.max_position_embeddings
    for n in (max_pos, max_pos + 7):
        ids = (r.prompt_ids * (n // len(r.prompt_ids) + 1))[:n]
        assert len(ids) == n
        check_raises(ValueError, lambda ids=ids: eng.generate(ids, max_new_tokens=1), (str(n), str(max_pos)))
        check_raises(ValueError, lambda ids=ids: list(eng.stream(ids, max_new_tokens=1)), (str(n), str(max_pos)))
    # one token shorter is fine
    out = eng.generate(
        (r.prompt_ids * (max_pos // len(r.prompt_ids) + 1))[: max_pos - 1], max_new_tokens=1, temperature=0
    )
    assert len(out.token_ids) == 1


BAD_OPTIONS = [
    ("max_new_tokens", -1),
    ("max_new_tokens", -100),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("top_p", math.nan),
    ("temperature", -0.5),
    ("temperature", math.nan),
    ("top_k", -1),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
]


@pytest.mark.parametrize("field,value", BAD_OPTIONS, ids=[f"{f}={v}" for f, v in BAD_OPTIONS])
def test_bad_option(eng, r, field, value):
    kw = {field: value}
    check_raises(ValueError, lambda: eng.generate(r.prompt_ids, **kw), field)
    check_raises(ValueError, lambda: eng.generate([r.prompt_ids, r.prompt_ids], **kw), field)
    check_raises(ValueError, lambda: list(eng.stream(r.prompt_ids, **kw)), field)
    check_raises(ValueError, lambda: eng.chat(r["chat_messages"], **kw), field)


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_p=1.0),
        dict(top_k=0),
        dict(min_p=0.0),
        dict(min_p=1.0),
        dict(temperature=0.0),
        dict(repetition_penalty=0.5),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_boundary_options_accepted(eng, r, kw):
    out = eng.generate(r.prompt_ids, max_new_tokens=3, seed=1, ignore_eos=True, **kw)
    assert len(out.token_ids) == 3


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda e, r: e.generate(5), "prompt"),
        (lambda e, r: e.generate([1.5]), "prompt"),
        (lambda e, r: e.generate([r.prompt_ids[0], "x"]), "prompt"),
        (lambda e, r: e.generate(None), "prompt"),
        (lambda e, r: e.generate(r.prompt_ids, max_new_tokens="3"), "max_new_tokens"),
        (lambda e, r: e.generate(r.prompt_ids, temperature="hot"), "temperature"),
        (lambda e, r: e.generate(r.prompt_ids, seed="x"), "seed"),
        (lambda e, r: list(e.stream(5)), "prompt"),
        (lambda e, r: e.forward(5), ("ids", "prompt")),
        (lambda e, r: e.chat(["hello"]), "message"),
        (lambda e, r: e.chat([5]), "message"),
        (lambda e, r: e.chat("hello"), "message"),
        (lambda e, r: e.tokenize(5), ("text", "str")),
    ],
    ids=[
        "prompt=5",
        "prompt=[1.5]",
        "prompt=[int,str]",
        "prompt=None",
        "max_new_tokens=str",
        "temperature=str",
        "seed=str",
        "stream(5)",
        "forward(5)",
        "chat([str])",
        "chat([int])",
        "chat(str)",
        "tokenize(5)",
    ],
)
def test_wrong_types(eng, r, call, needle):
    check_raises(TypeError, lambda: call(eng, r), needle)


def test_load_errors_leave_loaded_engine_working(tmp_path, eng, r):
    # a failed load in the same process does not disturb an engine already loaded
    d = copy_model(SINGLE, tmp_path / "m")
    f = _weight_files(d)[0]
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError):
        _load(d)
    assert_engine_ok(eng, r)
