// Prompt statistics of the FFN activation A (rows x n), added to the forward's accumulator
// acc = [sum_t A[t,j]^2 (n values), sum_t A[t,j]^2 / ||A[t,:]||^2 (n values)], with 0 for a row
// whose norm is 0. observe_rows: 1 / ||A[t,:]||^2 per row (one block per row). observe_cols: one
// thread per column adds its rows in order, over slices of `rows_per_chunk` rows (grid.y); with one
// slice it adds straight into acc, else it writes partials that observe_reduce adds in slice
// order. No atomics: the sums repeat run to run.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) observe_rows(const float *__restrict__ a, unsigned n, float *__restrict__ inv) {
    __shared__ float sh[33];
    const float *row = a + (size_t)blockIdx.x * n;
    float s = 0.f;
    for (unsigned j = threadIdx.x; j < n; j += blockDim.x) s += row[j] * row[j];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) inv[blockIdx.x] = s > 0.f ? 1.0f / s : 0.f;
}

extern "C" __global__ void __launch_bounds__(256)
    observe_cols(const float *__restrict__ a, const float *__restrict__ inv, unsigned rows, unsigned n, unsigned rows_per_chunk,
                 float *__restrict__ acc, float *__restrict__ partial) {
    const unsigned j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const unsigned r0 = blockIdx.y * rows_per_chunk, r1 = min(r0 + rows_per_chunk, rows);
    float s = 0.f, g = 0.f;
    for (unsigned t = r0; t < r1; ++t) {
        const float v = a[(size_t)t * n + j];
        const float v2 = v * v;
        s += v2;
        g += v2 * inv[t];
    }
    if (partial) {
        partial[(size_t)blockIdx.y * 2 * n + j] = s;
        partial[(size_t)blockIdx.y * 2 * n + n + j] = g;
    } else {
        acc[j] += s;
        acc[n + j] += g;
    }
}

extern "C" __global__ void __launch_bounds__(256) observe_reduce(const float *__restrict__ partial, unsigned chunks, unsigned n2,
                                                                 float *__restrict__ acc) {
    const unsigned k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n2) return;
    float s = 0.f;
    for (unsigned c = 0; c < chunks; ++c) s += partial[(size_t)c * n2 + k];
    acc[k] += s;
}
