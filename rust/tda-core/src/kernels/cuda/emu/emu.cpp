// The block / warp machinery of emu.h.
#include "emu.h"
#include "emu_launch.h"
#include <memory>
#include <thread>
#include <vector>

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
float *emu_dyn_smem = nullptr;

namespace {
struct Warp {
    std::barrier<> bar{32};
    unsigned char slot[32][8];
};
thread_local Warp *my_warp = nullptr;
thread_local int my_lane = 0;
thread_local std::barrier<> *my_block = nullptr;
}  // namespace

void __syncthreads() { my_block->arrive_and_wait(); }
int emu_lane() { return my_lane; }

void emu_shfl_exchange(const void *v, void *out, int src, size_t bytes) {
    std::memcpy(my_warp->slot[my_lane], v, bytes);
    my_warp->bar.arrive_and_wait();
    std::memcpy(out, my_warp->slot[src], bytes);
    my_warp->bar.arrive_and_wait();
}

void emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()> &body) {
    gridDim = grid;
    blockDim = block;
    const unsigned nt = block.x * block.y * block.z;
    std::vector<float> dyn(smem / 4 + 64, 0.f);
    emu_dyn_smem = dyn.data();
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> bar(nt);
                std::vector<std::unique_ptr<Warp>> warps;
                for (unsigned w = 0; w < (nt + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
                std::vector<std::thread> ts;
                ts.reserve(nt);
                for (unsigned t = 0; t < nt; ++t) {
                    ts.emplace_back([&, t] {
                        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        blockIdx = {bx, by, bz};
                        my_block = &bar;
                        my_warp = warps[t / 32].get();
                        my_lane = t % 32;
                        body();
                        my_warp->bar.arrive_and_drop();
                        my_block->arrive_and_drop();
                    });
                }
                for (auto &th : ts) th.join();
            }
}
