// Kernels over whole weight matrices: a uniform random fill made on the device (benchmark shapes
// that do not fit a host copy), and the squared norm of every row (in f64).
#include "common.cuh"

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// w[i] = (2 u - 1) * scale with u in [0, 1) from 24 bits of a hash of (seed, i).
template <typename T>
__device__ __forceinline__ void random_fill_impl(T *__restrict__ w, unsigned long long count, unsigned long long seed, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        const unsigned long long h = splitmix64(seed ^ splitmix64(i));
        const float u = (float)(h >> 40) * (1.0f / 16777216.0f);
        w[i] = from_f32<T>((2.0f * u - 1.0f) * scale);
    }
}

// out[r] = sum_c W[r, c]^2 in f64; one warp per row, 8 rows per block.
template <typename T>
__device__ __forceinline__ void row_sq_norms_impl(const T *__restrict__ W, unsigned rows, unsigned cols, double *__restrict__ out) {
    const unsigned row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T *w = W + (size_t)row * cols;
    double s = 0.0;
    for (unsigned c = lane; c < cols; c += 32) {
        const double v = (double)to_f32(w[c]);
        s += v * v;
    }
    s = warp_sum_d(s);
    if (lane == 0) out[row] = s;
}

#define WEIGHT_KERNELS(T, S)                                                                                       \
    extern "C" __global__ void random_fill_##S(T *w, unsigned long long count, unsigned long long seed, float scale) { \
        random_fill_impl<T>(w, count, seed, scale);                                                                \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) row_sq_norms_##S(const T *W, unsigned rows, unsigned cols, double *out) { \
        row_sq_norms_impl<T>(W, rows, cols, out);                                                                  \
    }
WEIGHT_KERNELS(float, f32)
WEIGHT_KERNELS(__nv_bfloat16, bf16)
WEIGHT_KERNELS(__half, f16)
