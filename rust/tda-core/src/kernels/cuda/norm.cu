// RMSNorm over rows: out = x / sqrt(mean(x^2) + eps) * g, in f32. One block per row (32 to 1024
// threads, by the row width): each thread sums the squares of a strided share of the row, a block
// reduction (fixed shuffle tree) gives the mean, then each thread scales the elements it read.
// `out` may be `x` (in place): every element is read and written by the same thread, after the
// barrier of the reduction.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024) rms_norm(const float *x, const float *__restrict__ g, float eps, int dim,
                                                            float *out) {
    __shared__ float sh[33];
    const size_t base = (size_t)blockIdx.x * dim;
    float s = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = x[base + i];
        s += v * v;
    }
    s = block_sum(s, sh);
    const float inv = 1.0f / sqrtf(s / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[base + i] = x[base + i] * inv * g[i];
}
