// Element-wise kernels (grid-stride loops over up to 2^64 elements) and the lookups that read
// the step from device memory: embed (token ids) and rope (first position).
#include "common.cuh"

#define GRID_STRIDE(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)(n); i += (size_t)gridDim.x * blockDim.x)

// x += y
extern "C" __global__ void add_f32(float *__restrict__ x, const float *__restrict__ y, unsigned long long n) {
    GRID_STRIDE(i, n) x[i] += y[i];
}

// x = cap * tanh(x / cap), as the CPU: tanh(x / cap) * cap
extern "C" __global__ void soft_cap(float *__restrict__ x, float cap, unsigned long long n) {
    GRID_STRIDE(i, n) x[i] = tanhf(x[i] / cap) * cap;
}

// a = act(a) * u (act 0: silu, 1: gelu-tanh)
extern "C" __global__ void gate_act(float *__restrict__ a, const float *__restrict__ u, unsigned long long n, int act) {
    GRID_STRIDE(i, n) a[i] = activate(act, a[i]) * u[i];
}

// a[t, j] *= keep[j] over rows of n values
extern "C" __global__ void mask_cols(float *__restrict__ a, const float *__restrict__ keep, unsigned long long total,
                                     unsigned n) {
    GRID_STRIDE(i, total) a[i] *= keep[i % n];
}

// The many-row sparse FFN activation (prefill, scoring) over `rows` rows of n values, as decoding
// decides it (ffn.cu). No gate (*gate_ptr == 0): a = act(a) * u * keep[j], gate_act then mask_cols.
// Gated: a = act(a) * u where neuron j is kept and |act(a)| >= t, else 0, row by row; the passing
// neurons (one atomic per block) and the rows (block 0) are added to counters[1] and counters[0].
extern "C" __global__ void __launch_bounds__(256)
    sparse_act(float *__restrict__ a, const float *__restrict__ u, const float *__restrict__ keep,
               const float *__restrict__ gate_ptr, unsigned long long *__restrict__ counters, unsigned rows, unsigned n,
               int act) {
    const float t = *gate_ptr;
    unsigned passed = 0;
    GRID_STRIDE(i, (size_t)rows * n) {
        const float g = activate(act, a[i]);
        if (t > 0.f) {
            const bool pass = keep[i % n] != 0.f && fabsf(g) >= t;
            a[i] = pass ? g * u[i] : 0.f;
            passed += pass;
        } else {
            a[i] = g * u[i] * keep[i % n];
        }
    }
    if (t > 0.f) count_gated(passed, rows, counters);
}

// out[t, j] += bias[j] over rows of `width` values
extern "C" __global__ void bias_rows(float *__restrict__ out, const float *__restrict__ bias, unsigned long long total,
                                     unsigned width) {
    GRID_STRIDE(i, total) out[i] += bias[i % width];
}

// Activations narrowed to the weights' half type, for the tensor-core GEMMs (round to nearest even).
extern "C" __global__ void f32_to_bf16(const float *__restrict__ x, __nv_bfloat16 *__restrict__ y, unsigned long long n) {
    GRID_STRIDE(i, n) y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void f32_to_f16(const float *__restrict__ x, __half *__restrict__ y, unsigned long long n) {
    GRID_STRIDE(i, n) y[i] = __float2half_rn(x[i]);
}

// x[i, :] = table[tokens[i], :] (* scale): widened to f32, then scaled, as the CPU. A token id past
// the table gives a zero row (the caller checks ids first; this only keeps the kernel in bounds).
template <typename T>
__device__ __forceinline__ void embed_impl(const T *__restrict__ table, const unsigned *__restrict__ tokens, unsigned rows,
                                           unsigned cols, unsigned vocab, float scale, int has_scale, float *__restrict__ x) {
    GRID_STRIDE(e, (size_t)rows * cols) {
        const size_t i = e / cols, c = e - i * cols;
        const unsigned tok = tokens[i];
        float v = tok < vocab ? to_f32(table[(size_t)tok * cols + c]) : 0.f;
        if (has_scale) v *= scale;
        x[e] = v;
    }
}

#define EMBED_KERNEL(T, S)                                                                                       \
    extern "C" __global__ void embed_##S(const T *table, const unsigned *tokens, unsigned rows, unsigned cols,    \
                                         unsigned vocab, float scale, int has_scale, float *x) {                 \
        embed_impl<T>(table, tokens, rows, cols, vocab, scale, has_scale, x);                                    \
    }
EMBED_KERNEL(float, f32)
EMBED_KERNEL(__nv_bfloat16, bf16)
EMBED_KERNEL(__half, f16)

// Rotate-half rope of `rows` rows of `width` values (heads of 2 * half) at positions start + i;
// cos / sin hold `half` values per position for `positions` positions.
extern "C" __global__ void rope(float *__restrict__ x, const float *__restrict__ cos_t, const float *__restrict__ sin_t,
                                const unsigned *__restrict__ start_ptr, unsigned rows, unsigned width, unsigned half,
                                unsigned positions) {
    const unsigned start = *start_ptr;
    const unsigned heads = width / (2 * half);
    GRID_STRIDE(e, (size_t)rows * heads * half) {
        const size_t i = e % half, rest = e / half;
        const size_t head = rest % heads, row = rest / heads;
        const size_t pos = start + row;
        if (pos >= positions) continue;
        const float c = cos_t[pos * half + i], s = sin_t[pos * half + i];
        float *hx = x + row * width + head * 2 * half;
        const float x1 = hx[i], x2 = hx[i + half];
        hx[i] = x1 * c - x2 * s;
        hx[i + half] = x2 * c + x1 * s;
    }
}
