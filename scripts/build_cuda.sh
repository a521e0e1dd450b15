#!/usr/bin/env bash
# Builds the CUDA artifacts that the GPU machine runs, on a machine without a GPU:
#   dist/cuda/tda_engine-*-abi3-*.whl   the Python package with `--features cuda` (abi3: any CPython >= 3.10)
#   dist/cuda/decode                    the decode benchmark binary with `--features cuda`
# both stripped, and checks that they and the working tree fit the device tool's 64 MiB transfer
# limit. Then prints how to run them on the GPU machine (docs/CUDA.md has the same).
#
#   bash scripts/build_cuda.sh
#
# Environment: CUDA_BUILD_VENV (see scripts/cuda_env.sh), MATURIN (a maturin executable to use),
# MATURIN_ARGS (extra arguments for `maturin build`, e.g. "--compatibility linux"),
# CARGO_TARGET_DIR (cargo's usual; default target/, shared with the CPU build so that dependencies
# built with the same features are reused).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
t_start=$SECONDS

# shellcheck source=scripts/cuda_env.sh
source scripts/cuda_env.sh

# maturin: $MATURIN, else the project venv's (.venv, from scripts/test.sh), else one installed into
# the CUDA build venv within pyproject.toml's build-system range.
maturin=${MATURIN:-}
if [ -z "$maturin" ] && [ -x .venv/bin/maturin ]; then
    maturin=.venv/bin/maturin
fi
if [ -z "$maturin" ]; then
    if [ ! -x "$CUDA_BUILD_VENV/bin/maturin" ]; then
        echo "build_cuda: installing maturin into $CUDA_BUILD_VENV"
        "$CUDA_BUILD_VENV/bin/python" -m pip install -q "maturin>=1.7,<2"
    fi
    maturin=$CUDA_BUILD_VENV/bin/maturin
fi
echo "build_cuda: $("$maturin" --version) ($maturin)"

target_dir=${CARGO_TARGET_DIR:-$root/target}
dist=dist/cuda
wheels=$target_dir/cuda-wheels
rm -rf "$wheels"
mkdir -p "$dist" "$wheels"

# 1. The wheel. pyproject.toml's [tool.maturin] gives the manifest (rust/tda-py), module name,
# python-source and profile; its `features` list is replaced, not extended, by --features on the
# command line, so pyo3/extension-module is named again here. --strip strips the extension module.
t=$SECONDS
# shellcheck disable=SC2086 # MATURIN_ARGS is a list of words
"$maturin" build --release --strip --features pyo3/extension-module,cuda --out "$wheels" ${MATURIN_ARGS:-}
shopt -s nullglob
built=("$wheels"/tda_engine-*.whl)
shopt -u nullglob
if [ "${#built[@]}" -ne 1 ]; then
    echo "build_cuda: expected one wheel in $wheels, found ${#built[@]}" >&2
    exit 1
fi
echo "build_cuda: wheel built in $((SECONDS - t)) s"

# 2. The decode bench.
t=$SECONDS
cargo build --release -p tda-bench --features cuda --bin decode
echo "build_cuda: decode built in $((SECONDS - t)) s"

# 3. Into dist/cuda (only this build's files), stripped.
rm -f "$dist"/*.whl "$dist"/decode "$dist"/BUILD_INFO.txt
cp "${built[0]}" "$dist/"
cp "$target_dir/release/decode" "$dist/decode"
if command -v strip >/dev/null; then
    strip --strip-all "$dist/decode"
else
    echo "build_cuda: no strip on PATH; dist/cuda/decode keeps its symbols" >&2
fi
wheel=$dist/$(basename "${built[0]}")

# What the GPU machine prints first: which build this is.
{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), glibc $(ldd --version 2>/dev/null | head -n 1 | awk '{print $NF}')"
    echo "nvcc: $("$NVCC" --version | tail -n 1)"
    echo "CUDA_ARCH=$CUDA_ARCH CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
    echo "wheel: $(basename "$wheel")  features: pyo3/extension-module,cuda"
    echo "decode: cargo build --release -p tda-bench --features cuda --bin decode"
    echo "decode links: $( (ldd "$dist/decode" 2>/dev/null || true) | awk '{print $1}' | tr '\n' ' ')"
} >"$dist/BUILD_INFO.txt"

# 4. Sizes. The device tool carries the working tree (tracked and untracked-not-ignored files)
# plus the carried paths, 64 MiB in all.
limit=$((64 * 1024 * 1024))
dist_bytes=$(du -cb "$dist"/* | tail -n 1 | cut -f1)
tree_bytes=$({ git ls-files -z -co --exclude-standard 2>/dev/null || true; } |
    du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1) || true
tree_bytes=${tree_bytes:-0}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo
echo "build_cuda: artifacts in $dist ($((SECONDS - t_start)) s in all):"
for f in "$dist"/*; do
    printf '  %-60s %s\n' "$f" "$(mib "$(stat -c %s "$f")")"
done
echo "  dist/cuda total $(mib "$dist_bytes"); working tree that travels $(mib "$tree_bytes");" \
    "together $(mib $((dist_bytes + tree_bytes))) of 64 MiB"
if [ "$dist_bytes" -gt "$limit" ] || [ $((dist_bytes + tree_bytes)) -gt "$limit" ]; then
    echo "build_cuda: over the 64 MiB the device tool carries" >&2
    exit 1
fi
venv_rel=${CUDA_BUILD_VENV#"$root"/}
if [ "$venv_rel" != "$CUDA_BUILD_VENV" ] && git rev-parse --is-inside-work-tree >/dev/null 2>&1 &&
    ! git check-ignore -q "$venv_rel"; then
    echo "build_cuda: WARNING: $venv_rel is not ignored by git: it would travel with the working tree" \
        "(hundreds of MB, over the limit). Add '/$venv_rel' to .gitignore." >&2
fi

cat <<EOF

On the GPU machine (no Rust there; python3 is the torch venv's), from the repository root, with
dist/cuda carried (device tool: carry ["dist/cuda"]):

  bash scripts/gpu_check.sh            # tests, benches, HF transformers; JSON under \$OUT

or by hand:

  export LD_LIBRARY_PATH=\$(python3 -c 'import nvidia.cu13 as m; print(m.__path__[0])')/lib:\${LD_LIBRARY_PATH:-}
  python3 -m pip install --no-index --no-deps --target /tmp/tda-site $wheel
  export PYTHONPATH=/tmp/tda-site
  python3 -c 'from tda_engine import Engine; print(Engine.from_pretrained("tests/fixtures/models/llama2", device="cuda").model_info)'
  python3 -m pytest -q tests/test_cuda.py
  $dist/decode --device cuda --preset llama-2-7b --dtype bf16 --sparsity dense,tda:0.5

(A venv made with 'python3 -m venv --system-site-packages' from the torch venv's python does not
see torch: its system site-packages are the base interpreter's. pip install --target does.)
EOF
