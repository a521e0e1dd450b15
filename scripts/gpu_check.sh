#!/usr/bin/env bash
# The one prepared check of the CUDA build on the GPU machine (an H200 lent through the device
# tool): run from the repository root with dist/cuda carried (built by scripts/build_cuda.sh).
#
#   bash scripts/gpu_check.sh          # device tool: carry ["dist/cuda"], timeout_s 420 or more
#
# Steps, each under `timeout` and skipped when too little of the budget is left, logging to $OUT:
#   0 env       nvidia-smi, driver, LD_LIBRARY_PATH for the cu13 libraries of torch's wheels,
#               the wheel installed with pip --target into a fresh folder on PYTHONPATH, one load
#   1 tests     tests/test_cuda.py (pytest if present, else its own runner), TDA_CUDA_REQUIRED=1
#   2 decode    dist/cuda/decode --device cuda, llama-2-7b bf16: dense, tda:0.7/0.5/0.3, griffin:0.5
#               (128 + 128 tokens), then a 1024-token prefill
#   3 hf        scripts/hf_gpu_decode.py, the same shape in transformers: eager (static cache),
#               then torch.compile'd
#   4 8b        the decode bench on llama-3-8b, then transformers eager on it, if time remains
# then prints a table last (tok/s, GB/s, % of the copy bandwidth, speedup vs dense and vs ideal,
# ratio to transformers) and writes it to $OUT/summary.json.
# $OUT (default ./gpu-out) gets at most 8 files (the device tool returns no more): env.log,
# tests.log, bench.log, decode_7b.json, prefill_7b.json, decode_8b.json, hf.json, summary.json.
# Environment: GPU_CHECK_BUDGET_S (default 320 s for the steps; with the final nvidia-smi and the
# table, each time-boxed too, the whole check ends within 6 minutes).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
T0=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-320}
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
STEPS=$WORK/steps.tsv
: >"$STEPS"
DECODE=dist/cuda/decode
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TDA_ENGINE_CACHE=$WORK/tda-cache # calibrations are made afresh, none taken from earlier runs
export TDA_CUDA_REQUIRED=1              # tests/test_cuda.py fails, not skips, when CUDA is not usable

left() { echo $((BUDGET - (SECONDS - T0))); }
say() { printf '[gpu_check %3ds] %s\n' $((SECONDS - T0)) "$*"; }
note() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"; } # step, status, seconds, detail

# run_step NAME CAP MIN LOG CMD...: CMD under `timeout` of min(CAP, seconds left); skipped when
# fewer than MIN seconds are left. Output goes to LOG; its tail is shown when the step fails.
run_step() {
    local name=$1 cap=$2 min=$3 log=$4 rem t s rc st d
    shift 4
    rem=$(left)
    if [ "$rem" -lt "$min" ]; then
        say "$name: skipped, ${rem}s left, needs ${min}s"
        note "$name" skipped 0 "${rem}s left, needs ${min}s"
        return 99
    fi
    t=$((cap < rem ? cap : rem))
    printf '\n=== %s (timeout %ss): %s\n' "$name" "$t" "$*" >>"$log"
    s=$SECONDS
    timeout -k 5 "$t" "$@" >>"$log" 2>&1
    rc=$?
    d=$((SECONDS - s))
    case $rc in
        0) st=ok ;;
        124 | 137) st=timeout ;;
        *) st=failed ;;
    esac
    note "$name" "$st" "$d" "rc=$rc, limit ${t}s"
    say "$name: $st (rc=$rc) in ${d}s"
    if [ "$rc" -ne 0 ] && [ -z "${NO_TAIL:-}" ]; then
        tail -n 8 "$log" | cut -c1-300 | sed 's/^/    | /'
    fi
    return "$rc"
}

# bench NAME CAP MIN JSON ARGS...: the decode bench with --json JSON; if this build of it has no
# --json, again without it, keeping the JSON lines it prints.
bench() {
    local name=$1 cap=$2 min=$3 json=$4 log rc
    shift 4
    log=$WORK/$name.log
    rm -f "$json"
    if [ ! -x "$DECODE" ]; then
        say "$name: skipped, no $DECODE (carry dist/cuda)"
        note "$name" skipped 0 "no $DECODE"
        return 1
    fi
    run_step "$name" "$cap" "$min" "$log" "$DECODE" "$@" --json "$json"
    rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 99 ] && grep -q -- "unknown argument --json" "$log"; then
        say "$name: this decode has no --json; again, taking the JSON lines from its output"
        run_step "$name" "$cap" "$min" "$log" "$DECODE" "$@"
        rc=$?
    fi
    if [ ! -s "$json" ] && [ -f "$log" ]; then
        grep '^{' "$log" >"$json" 2>/dev/null || rm -f "$json"
    fi
    [ -f "$log" ] && cat "$log" >>"$OUT/bench.log"
    return "$rc"
}

# ---------------------------------------------------------------------------------------------
# 0. environment
ENVLOG=$OUT/env.log
say "env: logging to $ENVLOG; budget ${BUDGET}s"
{
    echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD"
    echo "== build"
    cat dist/cuda/BUILD_INFO.txt 2>/dev/null || echo "no dist/cuda/BUILD_INFO.txt"
    ls -l dist/cuda 2>&1
    echo "== nvidia-smi"
    timeout 20 nvidia-smi -L
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,temperature.gpu,power.draw,power.limit --format=csv
    echo "== host"
    uname -a
    echo "cpus: $(nproc)"
    free -g 2>/dev/null | head -n 2
    echo "== python"
    command -v python3
    python3 --version
    timeout 60 python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("transformers", transformers.__version__)'
    python3 -c 'import pytest; print("pytest", pytest.__version__)' 2>&1
} >"$ENVLOG" 2>&1
GPU=$(timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader -i 0 2>/dev/null | head -n 1)
say "env: GPU ${GPU:-none found by nvidia-smi}"

# The CUDA libraries (libcublas.so.13, libnvrtc.so.13, libcudart.so.13) come with torch's nvidia-*
# wheels under nvidia/cu13/lib; libcuda.so.1 with the driver.
CU_LIBS=$(timeout 30 python3 - 2>>"$ENVLOG" <<'EOF'
import os
import nvidia.cu13 as m
print(":".join(os.path.join(p, "lib") for p in m.__path__ if os.path.isdir(os.path.join(p, "lib"))))
EOF
)
if [ -n "$CU_LIBS" ]; then
    export LD_LIBRARY_PATH="$CU_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    say "env: WARNING: python3 has no nvidia.cu13 (the CUDA libraries will not be found)"
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
        if [ -e "$d/libcuda.so.1" ]; then
            export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
            break
        fi
    done
fi
{
    echo "== LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    for d in ${CU_LIBS//:/ }; do echo "$d:" "$d"/*; done
    ldconfig -p 2>/dev/null | grep 'libcuda\.so' || echo "libcuda.so.1 not in the ldconfig cache"
} >>"$ENVLOG" 2>&1

# The wheel, into a fresh folder on PYTHONPATH. (python3 here is a venv's; a venv made from it with
# --system-site-packages would see the base interpreter's packages, not torch.)
SITE=$WORK/site
WHEEL=
for w in dist/cuda/tda_engine-*.whl; do [ -f "$w" ] && WHEEL=$w && break; done
ENV_OK=0
if [ -z "$WHEEL" ]; then
    say "env: no dist/cuda/tda_engine-*.whl (carry dist/cuda; build it with scripts/build_cuda.sh)"
else
    if ! timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEEL" >>"$ENVLOG" 2>&1; then
        echo "pip install --target failed; unpacking the wheel instead" >>"$ENVLOG"
        timeout 30 python3 -m zipfile -e "$WHEEL" "$SITE" >>"$ENVLOG" 2>&1
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "== load probe ($WHEEL)" >>"$ENVLOG"
    if timeout 90 python3 - >"$WORK/probe.log" 2>&1 <<'EOF'; then
import time
import tda_engine
from tda_engine import Engine
print("tda_engine", tda_engine.__version__, "from", tda_engine.__file__)
t = time.perf_counter()
eng = Engine.from_pretrained("tests/fixtures/models/llama2", device="cuda")
print(f"loaded on cuda in {time.perf_counter() - t:.2f} s:", dict(eng.model_info))
out = eng.generate([1, 2, 3, 4], max_new_tokens=4, temperature=0, ignore_eos=True)
print("generate:", out.token_ids, out.timings)
EOF
        ENV_OK=1
    fi
    cat "$WORK/probe.log" >>"$ENVLOG"
fi
for f in "$DECODE" "$SITE"/tda_engine/_native*.so; do
    [ -e "$f" ] && { echo "== ldd $f"; ldd "$f"; } >>"$ENVLOG" 2>&1
done
if [ "$ENV_OK" = 1 ]; then
    note env ok $((SECONDS - T0)) "wheel loads, device=cuda works"
    say "env: ok, $(grep -m1 '^loaded on cuda' "$WORK/probe.log" | cut -c1-160)"
else
    note env failed $((SECONDS - T0)) "see env.log"
    say "env: the CUDA load probe failed:"
    [ -f "$WORK/probe.log" ] && tail -n 4 "$WORK/probe.log" | cut -c1-300 | sed 's/^/    | /'
fi

# ---------------------------------------------------------------------------------------------
# 1. the CUDA tests
if [ -n "$WHEEL" ]; then
    if python3 -c 'import pytest' 2>/dev/null; then
        targs=(-m pytest -q -rfEs -p no:cacheprovider tests/test_cuda.py)
        python3 -c 'import pytest_timeout' 2>/dev/null && targs+=(--timeout 100)
    else
        targs=(tests/test_cuda.py)
    fi
    NO_TAIL=1 COLUMNS=200 run_step tests 120 30 "$OUT/tests.log" python3 "${targs[@]}"
    summary=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$OUT/tests.log" | tail -n 1)
    say "tests: ${summary:-no summary line (see tests.log)}"
    nfail=$(grep -cE '^(FAILED|ERROR) ' "$OUT/tests.log")
    grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -n 20 | cut -c1-200 | sed 's/^/    /'
    [ "$nfail" -gt 20 ] && echo "    ... $((nfail - 20)) more in tests.log"
    [ -n "$summary" ] || tail -n 12 "$OUT/tests.log" | cut -c1-300 | sed 's/^/    | /'
else
    note tests skipped 0 "no wheel"
fi

# ---------------------------------------------------------------------------------------------
# 2. the decode bench on the device, llama-2-7b bf16
SPARSITY=dense,tda:0.7,tda:0.5,tda:0.3,griffin:0.5
bench decode_7b 100 40 "$OUT/decode_7b.json" --device cuda --preset llama-2-7b --dtype bf16 \
    --sparsity "$SPARSITY" --prompt-tokens 128 --new-tokens 128 --repeat 3
bench prefill_7b 45 20 "$OUT/prefill_7b.json" --device cuda --preset llama-2-7b --dtype bf16 \
    --sparsity dense --prompt-tokens 1024 --new-tokens 8 --repeat 3

# ---------------------------------------------------------------------------------------------
# 3. transformers on the same GPU and shape
HF=(python3 scripts/hf_gpu_decode.py --dtype bf16 --prompt-tokens 128 --new-tokens 128 --repeat 3 --json "$OUT/hf.json")
rm -f "$OUT/hf.json"
hf() { # hf NAME CAP MIN ARGS...
    local name=$1 cap=$2 min=$3
    shift 3
    run_step "$name" "$cap" "$min" "$WORK/$name.log" "${HF[@]}" "$@"
    [ -f "$WORK/$name.log" ] && cat "$WORK/$name.log" >>"$OUT/bench.log"
}
hf hf_eager_7b 90 40 --preset llama-2-7b --prefill-tokens 1024
hf hf_compiled_7b 150 90 --preset llama-2-7b --compile

# ---------------------------------------------------------------------------------------------
# 4. llama-3-8b, if time remains
bench decode_8b 90 45 "$OUT/decode_8b.json" --device cuda --preset llama-3-8b --dtype bf16 \
    --sparsity "$SPARSITY" --prompt-tokens 128 --new-tokens 128 --repeat 3
hf hf_eager_8b 80 55 --preset llama-3-8b

{
    echo "== nvidia-smi at the end"
    timeout 10 nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
} >>"$ENVLOG" 2>&1

# ---------------------------------------------------------------------------------------------
# The table, last.
GPU_NAME="$GPU" ELAPSED=$((SECONDS - T0)) timeout 20 python3 - "$OUT" "$STEPS" <<'EOF'
import json, os, re, sys
from pathlib import Path

out, steps_file = Path(sys.argv[1]), Path(sys.argv[2])

def lines(name):
    p = out / name
    if not p.exists():
        return []
    rows = []
    for ln in p.read_text().splitlines():
        ln = ln.strip()
        if ln.startswith("{"):
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:
                pass
    return rows

def first(d, *keys):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None

steps = [dict(zip(["step", "status", "seconds", "detail"], ln.split("\t"))) for ln in steps_file.read_text().splitlines() if ln]
hf = lines("hf.json")
hf_decode = {(h.get("preset"), h.get("variant")): h for h in hf if h.get("kind") != "prefill"}
hf_prefill = {(h.get("preset"), h.get("variant")): h for h in hf if h.get("kind") == "prefill"}

table, copy_bw = [], {}
for fname, preset in (("decode_7b.json", "llama-2-7b"), ("decode_8b.json", "llama-3-8b")):
    for r in lines(fname):
        if r.get("bench", "decode") != "decode" or "decode_tok_s" not in r:
            continue
        # the bench's bandwidth ceiling: its device-to-device copy (key names of --device cuda), else its roofline
        bw = first(r, "copy_gb_s", "copy_bandwidth_gb_s", "device_copy_gb_s", "roofline_gb_s")
        tok = r["decode_tok_s"]
        gbs = first(r, "achieved_gb_s") or (r.get("weight_bytes_per_token", 0) * tok / 1e9)
        frac = first(r, "fraction_of_copy", "fraction_of_copy_bandwidth", "fraction_of_roofline")
        if frac is None and bw:
            frac = gbs / bw
        if bw:
            copy_bw.setdefault(preset, bw)
        row = {
            "preset": preset, "config": f"{r.get('dtype', '')} {r.get('sparsity', '')}", "tok_s": tok, "gb_s": gbs,
            "copy_gb_s": bw, "of_copy": frac, "kept": r.get("ffn_kept_fraction"),
            "speedup": r.get("speedup_vs_dense"), "ideal": r.get("ideal_speedup"), "of_ideal": r.get("fraction_of_ideal"),
            "prefill_tok_s": r.get("prefill_tok_s"),
        }
        for variant in ("eager-static", "compiled-static"):
            h = hf_decode.get((preset, variant))
            row[f"vs_hf_{variant.split('-')[0]}"] = tok / h["decode_tok_s"] if h else None
        table.append(row)
for (preset, variant), h in sorted(hf_decode.items()):
    bw = copy_bw.get(preset)
    table.append({
        "preset": preset, "config": f"HF {variant}" + ("" if h.get("compiled") or variant == "eager-static" else " (not compiled!)"),
        "tok_s": h["decode_tok_s"], "gb_s": h.get("achieved_gb_s"), "copy_gb_s": bw,
        "of_copy": (h["achieved_gb_s"] / bw) if bw and h.get("achieved_gb_s") else None,
        "prefill_tok_s": h.get("prefill_tok_s"),
    })

prefill = [r for r in lines("prefill_7b.json") if r.get("bench", "decode") == "decode" and "prefill_tok_s" in r]
tests_line = None
tl = out / "tests.log"
if tl.exists():
    m = [ln for ln in tl.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    tests_line = m[-1].strip("= ").strip() if m else None

summary = {
    "gpu": os.environ.get("GPU_NAME"), "elapsed_s": int(os.environ.get("ELAPSED", "0")), "steps": steps,
    "tests": tests_line, "decode": table, "prefill_1024": prefill, "hf": hf,
    "hf_prefill": list(hf_prefill.values()),
}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

def f(x, fmt, suffix=""):
    width = int(re.match(r"\d*", fmt).group() or 0)
    return (format(x, fmt) + suffix) if isinstance(x, (int, float)) else "-".rjust(width + len(suffix))

print()
print(f"GPU: {summary['gpu'] or '?'}; {summary['elapsed_s']} s; tests: {tests_line or '-'}")
print("steps: " + ", ".join(f"{s['step']} {s['status']} {s['seconds']}s" for s in steps))
for r in prefill:
    h = hf_prefill.get(("llama-2-7b", "eager-static"))
    extra = f", HF eager {h['prefill_tok_s']:.0f} tok/s" if h else ""
    print(f"prefill llama-2-7b {r.get('dtype')} {r.get('prompt_tokens')} tokens: {r['prefill_tok_s']:.0f} tok/s{extra}")
head = f"{'model':<11} {'config':<24} {'tok/s':>8} {'GB/s':>7} {'copy GB/s':>9} {'% copy':>6} {'speedup':>7} {'ideal':>6} {'of ideal':>8} {'/HF eager':>9} {'/HF comp':>8}"
print(head)
print("-" * len(head))
for r in table:
    print(
        f"{r['preset']:<11} {r['config']:<24} {f(r['tok_s'], '8.1f')} {f(r['gb_s'], '7.0f')} {f(r.get('copy_gb_s'), '9.0f')} "
        f"{f(100 * r['of_copy'] if r.get('of_copy') is not None else None, '5.0f', '%')} {f(r.get('speedup'), '6.2f', 'x')} "
        f"{f(r.get('ideal'), '5.2f', 'x')} {f(r.get('of_ideal'), '8.2f')} {f(r.get('vs_hf_eager'), '8.2f', 'x')} "
        f"{f(r.get('vs_hf_compiled'), '7.2f', 'x')}"
    )
if not table:
    print("(no decode results: see bench.log)")
print(f"files: {', '.join(sorted(p.name for p in out.iterdir()))}")
EOF
rm -rf "$WORK"
