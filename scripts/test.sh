#!/usr/bin/env bash
# Sets up a virtual environment, builds the extension (release) and runs every test:
# pytest (Python API, parity with HF transformers, CLI) and cargo test (Rust units).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pytest -q tests
cargo test --release -q -p tda-core
