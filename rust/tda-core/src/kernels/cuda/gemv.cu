// Decode-time weight streaming: `y = W x + b` for one row (GEMV), the q/k/v projections in one
// launch, and `out = sum_i a_i W[row_i, :]` (the transposed product, split over the rows) with
// its fixed-order reduction.
//
// GEMV: one warp per output row, 8 rows per 256-thread block. Each lane reads 16-byte vectors of
// the row, four independent loads per iteration, so that every SM keeps tens of KiB in flight
// (what streaming HBM at full speed takes); x is read through the read-only cache, where all the
// warps of an SM find it. A row whose byte length is not a multiple of 16 (tiny fixture shapes)
// takes the scalar path, lane-strided and still coalesced: `vec` is 0.
//
// Transposed product: a 2-D grid, x over column blocks (each thread owns one 16-byte vector of
// columns), y over `chunks` slices of the rows. The number of rows (`count`) may live in device
// memory; each block takes `ceil(count / chunks)` of them, so the grid depends only on the
// capacity (it stays valid inside a recorded graph) while the work spreads over all blocks
// whatever the count. Every block writes its partial row (zeros when it had no rows), and
// `reduce_partials` adds them in block order: no atomics, results repeat run to run.
#include "common.cuh"

// ---- GEMV --------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void gemv_row(const T *__restrict__ W, const float *__restrict__ bias, const float *__restrict__ x,
                                         float *__restrict__ y, int row, int cols, int vec, int lane) {
    const float s = row_dot<T>(W + (size_t)row * cols, x, cols, vec, lane);
    if (lane == 0) y[row] = bias ? s + bias[row] : s;
}

// grid: ceil(rows / 8) blocks of 256 threads.
template <typename T>
__device__ __forceinline__ void gemv_impl(const T *W, const float *bias, const float *x, float *y, int rows, int cols, int vec) {
    const int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row < rows) gemv_row<T>(W, bias, x, y, row, cols, vec, lane);
}

// q, k and v of one token: the warps of one grid walk the rows of the three matrices in turn.
// grid: ceil((r0 + r1 + r2) / 8) blocks of 256 threads.
template <typename T>
__device__ __forceinline__ void linear3_impl(const T *W0, const float *b0, float *y0, int r0, const T *W1, const float *b1,
                                             float *y1, int r1, const T *W2, const float *b2, float *y2, int r2,
                                             const float *x, int cols, int vec) {
    int g = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (g < r0) {
        gemv_row<T>(W0, b0, x, y0, g, cols, vec, lane);
        return;
    }
    g -= r0;
    if (g < r1) {
        gemv_row<T>(W1, b1, x, y1, g, cols, vec, lane);
        return;
    }
    g -= r1;
    if (g < r2) gemv_row<T>(W2, b2, x, y2, g, cols, vec, lane);
}

// ---- transposed product, split over rows ---------------------------------------------------------

// partial[blockIdx.y][c] = sum over this block's rows i of a[i] * W[row(i), c], row(i) = idx ? idx[i] : i,
// for i < count = min(count_ptr ? *count_ptr : n, n). Vector path: grid.x = ceil(cols / (128 * N)),
// one 16-byte vector of columns per thread; scalar path: grid.x = ceil(cols / 128), one column each.
// Gated (a per-token gate threshold *gate_ptr > 0, read from device memory like the count): the
// neurons that did not pass have a[i] == 0 exactly (ffn.cu) and their rows are not read; the others
// are added in the same order as ungated.
template <typename T>
__device__ __forceinline__ void rows_axpy_impl(const T *__restrict__ W, int cols, const float *__restrict__ a,
                                               const unsigned *__restrict__ idx, const unsigned *__restrict__ count_ptr,
                                               const float *__restrict__ gate_ptr, unsigned n, int vec,
                                               float *__restrict__ partial) {
    const unsigned count = count_ptr ? min(*count_ptr, n) : n;
    const bool gated = gate_ptr && *gate_ptr > 0.f;
    const unsigned share = (count + gridDim.y - 1) / gridDim.y;
    const unsigned i0 = min(blockIdx.y * share, count), i1 = min(i0 + share, count);
    float *out = partial + (size_t)blockIdx.y * cols;
    if (vec) {
        constexpr int N = Vec16<T>::N;
        const int c0 = (int)(blockIdx.x * blockDim.x + threadIdx.x) * N;
        if (c0 >= cols) return;
        float acc[N];
#pragma unroll
        for (int k = 0; k < N; ++k) acc[k] = 0.f;
        unsigned i = i0;
        if (gated) {
            // The next four passing rows (every thread of the block scans the same a[i]: no
            // divergence), loaded together; slots past the block's rows stay empty (s == 0) and
            // load nothing. Ends at i1, so the ungated loops below add nothing.
            while (i < i1) {
                unsigned j[4];
                float s[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    while (i < i1 && a[i] == 0.f) ++i;
                    s[q] = i < i1 ? a[i] : 0.f;
                    j[q] = i < i1 ? (idx ? idx[i] : i) : 0;
                    i += i < i1;
                }
                uint4 w[4] = {};
#pragma unroll
                for (int q = 0; q < 4; ++q)
                    if (s[q] != 0.f) w[q] = ld_vec(W + (size_t)j[q] * cols + c0);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    if (s[q] == 0.f) continue;
                    float f[N];
                    unpack(w[q], f, T());
#pragma unroll
                    for (int k = 0; k < N; ++k) acc[k] += s[q] * f[k];
                }
            }
        }
        for (; i + 4 <= i1; i += 4) {
            const unsigned j0 = idx ? idx[i] : i, j1 = idx ? idx[i + 1] : i + 1;
            const unsigned j2 = idx ? idx[i + 2] : i + 2, j3 = idx ? idx[i + 3] : i + 3;
            const uint4 w0 = ld_vec(W + (size_t)j0 * cols + c0), w1 = ld_vec(W + (size_t)j1 * cols + c0);
            const uint4 w2 = ld_vec(W + (size_t)j2 * cols + c0), w3 = ld_vec(W + (size_t)j3 * cols + c0);
            const float s0 = a[i], s1 = a[i + 1], s2 = a[i + 2], s3 = a[i + 3];
            float f[N];
            unpack(w0, f, T());
#pragma unroll
            for (int k = 0; k < N; ++k) acc[k] += s0 * f[k];
            unpack(w1, f, T());
#pragma unroll
            for (int k = 0; k < N; ++k) acc[k] += s1 * f[k];
            unpack(w2, f, T());
#pragma unroll
            for (int k = 0; k < N; ++k) acc[k] += s2 * f[k];
            unpack(w3, f, T());
#pragma unroll
            for (int k = 0; k < N; ++k) acc[k] += s3 * f[k];
        }
        for (; i < i1; ++i) {
            const unsigned j = idx ? idx[i] : i;
            float f[N];
            unpack(ld_vec(W + (size_t)j * cols + c0), f, T());
            const float s = a[i];
#pragma unroll
            for (int k = 0; k < N; ++k) acc[k] += s * f[k];
        }
#pragma unroll
        for (int k = 0; k < N; k += 4)
            *reinterpret_cast<float4 *>(out + c0 + k) = make_float4(acc[k], acc[k + 1], acc[k + 2], acc[k + 3]);
    } else {
        const int c = (int)(blockIdx.x * blockDim.x + threadIdx.x);
        if (c >= cols) return;
        float acc = 0.f;
        for (unsigned i = i0; i < i1; ++i) {
            if (gated && a[i] == 0.f) continue;
            const unsigned j = idx ? idx[i] : i;
            acc += a[i] * to_f32(W[(size_t)j * cols + c]);
        }
        out[c] = acc;
    }
}

// out[c] = sum_{b < chunks} partial[b][c] (+ bias[c]), added in b order. Block (32, 8): x = a column
// of a 32-column tile, y = every 8th chunk; the 8 sums are then added in y order.
extern "C" __global__ void __launch_bounds__(256) reduce_partials(const float *__restrict__ partial, int chunks, int cols,
                                                                  const float *__restrict__ bias, float *__restrict__ out) {
    __shared__ float sh[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (c < cols)
        for (int b = threadIdx.y; b < chunks; b += 8) s += partial[(size_t)b * cols + c];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = sh[0][threadIdx.x];
#pragma unroll
        for (int y = 1; y < 8; ++y) t += sh[y][threadIdx.x];
        out[c] = bias ? t + bias[c] : t;
    }
}

#define GEMV_KERNELS(T, S)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                                                      \
        gemv_##S(const T *W, const float *bias, const float *x, float *y, int rows, int cols, int vec) {                   \
        gemv_impl<T>(W, bias, x, y, rows, cols, vec);                                                                      \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                                      \
        linear3_##S(const T *W0, const float *b0, float *y0, int r0, const T *W1, const float *b1, float *y1, int r1,      \
                    const T *W2, const float *b2, float *y2, int r2, const float *x, int cols, int vec) {                  \
        linear3_impl<T>(W0, b0, y0, r0, W1, b1, y1, r1, W2, b2, y2, r2, x, cols, vec);                                     \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128)                                                                      \
        rows_axpy_##S(const T *W, int cols, const float *a, const unsigned *idx, const unsigned *count_ptr,              \
                      const float *gate_ptr, unsigned n, int vec, float *partial) {                                        \
        rows_axpy_impl<T>(W, cols, a, idx, count_ptr, gate_ptr, n, vec, partial);                                          \
    }

GEMV_KERNELS(float, f32)
GEMV_KERNELS(__nv_bfloat16, bf16)
GEMV_KERNELS(__half, f16)
