#!/usr/bin/env bash
# Builds the kernels (../*.cu) for the CPU emulation of emu.h and runs tests.cpp against them:
#   bash src/kernels/cuda/emu/run.sh
# Needs g++ >= 12 (C++20 std::barrier, _Float16). No GPU, no CUDA toolkit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${EMU_OUT:-$(mktemp -d)}
objs=()
for f in gemv ffn attention norm elementwise stats weights sample; do
    # Dynamic shared memory is a buffer of the launcher in the emulation.
    sed 's/extern __shared__ float smem\[\];/float *smem = emu_dyn_smem;/' "$here/../$f.cu" >"$out/$f.cpp"
    g++ -std=c++20 -O1 -g -w -pthread -include "$here/emu.h" -I "$here/include" -I "$here/.." -c "$out/$f.cpp" -o "$out/$f.o" &
    objs+=("$out/$f.o")
done
g++ -std=c++20 -O1 -g -w -pthread -I "$here" -c "$here/emu.cpp" -o "$out/emu.o" &
g++ -std=c++20 -O1 -g -w -pthread -I "$here" -c "$here/tests.cpp" -o "$out/tests.o" &
wait
g++ -pthread "${objs[@]}" "$out/emu.o" "$out/tests.o" -o "$out/tests"
"$out/tests"
