# shellcheck shell=bash
# Sourced, not run:  source scripts/cuda_env.sh
#
# Sets up what a `--features cuda` build needs on a machine without a GPU or a CUDA install: a
# virtual environment with NVIDIA's pinned CUDA 13.0 toolkit wheels (nvcc, NVVM, the CRT headers,
# the runtime, CCCL), made once and reused, then exports
#   NVCC              the wheels' nvcc (build scripts compile the kernels with it)
#   CUDA_ARCH         sm_90 (H100/H200), unless already set
#   CUDA_COMPUTE_CAP  90, the same target in the form candle's and bindgen_cuda's build scripts read
#   PATH              with the toolkit's bin/ first, for build scripts that look for `nvcc` on PATH
#   CUDA_BUILD_VENV   the virtual environment's path
# and prints what it set. The venv is CUDA_BUILD_VENV if set, else .venv-cuda-build in the
# repository root (ignored by git; it is several hundred MB and must never travel to a device).
# Nothing here needs a GPU or libcuda: the kernels are compiled here and the CUDA libraries are
# loaded at run time on the GPU machine (see docs/CUDA.md).

_tda_cuda_env() {
    local root pins py cu ver
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
    CUDA_BUILD_VENV=${CUDA_BUILD_VENV:-$root/.venv-cuda-build}
    # The five wheels that make a working nvcc 13.0 (all five pins are needed; see
    # shared/cuda-build/README.md).
    pins=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
    py=$CUDA_BUILD_VENV/bin/python
    if [ ! -x "$py" ]; then
        echo "cuda_env: creating $CUDA_BUILD_VENV" >&2
        python3 -m venv "$CUDA_BUILD_VENV" || return 1
    fi
    # Install only when a pin is missing or at another version (a no-op check takes ~0.1 s).
    if ! "$py" - "${pins[@]}" <<'EOF'
import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if have != want:
        sys.exit(1)
EOF
    then
        echo "cuda_env: installing ${pins[*]}" >&2
        "$py" -m pip install -q "${pins[@]}" || return 1
    fi
    # The wheels share the namespace package nvidia.cu13; the folder with bin/nvcc is the toolkit.
    cu=$("$py" - <<'EOF'
import os
import nvidia.cu13 as m
found = [p for p in m.__path__ if os.path.isfile(os.path.join(p, "bin", "nvcc"))]
print(found[0] if found else "")
EOF
    ) || return 1
    if [ -z "$cu" ]; then
        echo "cuda_env: no bin/nvcc under nvidia.cu13 in $CUDA_BUILD_VENV" >&2
        return 1
    fi
    export CUDA_BUILD_VENV
    export NVCC=$cu/bin/nvcc
    export CUDA_ARCH=${CUDA_ARCH:-sm_90}
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-${CUDA_ARCH#sm_}}
    case ":$PATH:" in
        *":$cu/bin:"*) ;;
        *) export PATH="$cu/bin:$PATH" ;;
    esac
    ver=$("$NVCC" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n 1)
    if [ -z "$ver" ]; then
        echo "cuda_env: $NVCC does not run" >&2
        return 1
    fi
    echo "cuda_env: NVCC=$NVCC (release $ver)"
    echo "cuda_env: CUDA_ARCH=$CUDA_ARCH CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
    echo "cuda_env: CUDA_BUILD_VENV=$CUDA_BUILD_VENV; PATH starts with $cu/bin"
}

_tda_cuda_env
_tda_cuda_env_rc=$?
unset -f _tda_cuda_env
if [ "$_tda_cuda_env_rc" -ne 0 ]; then
    unset _tda_cuda_env_rc
    echo "cuda_env: failed; nothing usable was exported" >&2
    # shellcheck disable=SC2317 # reached when this file is run instead of sourced
    return 1 2>/dev/null || exit 1
fi
unset _tda_cuda_env_rc
