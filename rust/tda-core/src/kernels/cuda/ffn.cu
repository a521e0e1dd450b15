// The first half of the fused decode FFN: for the i-th kept neuron j = idx[i] (j = i when dense),
// a[i] = act(g_j . x + bg_j) * (u_j . x + bu_j). One warp per kept neuron reads its gate and up
// rows with 16-byte loads, two of each in flight per lane (four independent loads). The kept
// count is read from device memory and the grid is sized for all n neurons: warps past the count
// leave at once, so a recorded graph serves every selection. The second half,
// `out = sum_i a[i] down_t[idx[i], :]`, is `rows_axpy` + `reduce_partials` (gemv.cu).
//
// Per-token gating (CATS): with a gate threshold t = *gate_ptr > 0 (in device memory beside the
// count, for the same reason), each warp reads its gate row alone first; a neuron whose
// |act(g_j . x + bg_j)| is below t writes a[i] = 0 and reads no up row (nor, in rows_axpy, its down
// row). The passing neurons are counted per block and added with one atomic per block to
// counters[1], and block 0 adds the token row to counters[0] (integers: the totals are exact).
#include "common.cuh"

// Both dot products of one 16-byte vector of the gate and up rows with the same x.
template <typename T>
__device__ __forceinline__ void dot2_vec(const uint4 &wg, const uint4 &wu, const float *__restrict__ x, float &sg, float &su) {
    constexpr int N = Vec16<T>::N;
    float g[N], u[N];
    unpack(wg, g, T());
    unpack(wu, u, T());
#pragma unroll
    for (int i = 0; i < N; i += 4) {
        const float4 xv = __ldg(reinterpret_cast<const float4 *>(x + i));
        sg += g[i] * xv.x + g[i + 1] * xv.y + g[i + 2] * xv.z + g[i + 3] * xv.w;
        su += u[i] * xv.x + u[i + 1] * xv.y + u[i + 2] * xv.z + u[i + 3] * xv.w;
    }
}

// The gated half for neuron i (all the block's threads, past the count too, for the block's count).
template <typename T>
__device__ __forceinline__ void ffn_gated(const T *__restrict__ G, const T *__restrict__ U, const float *__restrict__ bg,
                                          const float *__restrict__ bu, const float *__restrict__ x, int d,
                                          const unsigned *__restrict__ idx, unsigned i, unsigned count, float t,
                                          unsigned long long *__restrict__ counters, int act, int vec,
                                          float *__restrict__ a) {
    const int lane = threadIdx.x & 31;
    unsigned passed = 0;
    if (i < count) {
        const unsigned j = idx ? idx[i] : i;
        // Every lane holds the same sum, so the whole warp takes the same branch.
        const float ga = activate(act, row_dot<T>(G + (size_t)j * d, x, d, vec, lane) + (bg ? bg[j] : 0.f));
        if (fabsf(ga) >= t) {
            const float su = row_dot<T>(U + (size_t)j * d, x, d, vec, lane);
            if (lane == 0) a[i] = ga * (su + (bu ? bu[j] : 0.f));
            passed = lane == 0;
        } else if (lane == 0) {
            a[i] = 0.f;
        }
    }
    count_gated(passed, 1, counters);
}

template <typename T>
__device__ __forceinline__ void ffn_gate_up_impl(const T *__restrict__ G, const T *__restrict__ U, const float *__restrict__ bg,
                                                 const float *__restrict__ bu, const float *__restrict__ x, int d,
                                                 const unsigned *__restrict__ idx, const unsigned *__restrict__ count_ptr,
                                                 const float *__restrict__ gate_ptr, unsigned long long *__restrict__ counters,
                                                 unsigned n, int act, int vec, float *__restrict__ a) {
    const unsigned i = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const unsigned count = count_ptr ? min(*count_ptr, n) : n;
    const float t = gate_ptr ? *gate_ptr : 0.f;
    if (t > 0.f) return ffn_gated<T>(G, U, bg, bu, x, d, idx, i, count, t, counters, act, vec, a);
    if (i >= count) return;
    const unsigned j = idx ? idx[i] : i;
    const T *g = G + (size_t)j * d, *u = U + (size_t)j * d;
    float g0 = 0.f, g1 = 0.f, u0 = 0.f, u1 = 0.f;
    if (vec) {
        constexpr int N = Vec16<T>::N;
        const uint4 *gv = reinterpret_cast<const uint4 *>(g), *uv = reinterpret_cast<const uint4 *>(u);
        const int nv = d / N;
        int v = lane;
        for (; v + 32 < nv; v += 64) {
            const uint4 wg0 = ld_vec(gv + v), wg1 = ld_vec(gv + v + 32), wu0 = ld_vec(uv + v), wu1 = ld_vec(uv + v + 32);
            dot2_vec<T>(wg0, wu0, x + (size_t)v * N, g0, u0);
            dot2_vec<T>(wg1, wu1, x + (size_t)(v + 32) * N, g1, u1);
        }
        for (; v < nv; v += 32) dot2_vec<T>(ld_vec(gv + v), ld_vec(uv + v), x + (size_t)v * N, g0, u0);
    } else {
        for (int c = lane; c < d; c += 32) {
            const float xv = __ldg(x + c);
            g0 += to_f32(g[c]) * xv;
            u0 += to_f32(u[c]) * xv;
        }
    }
    const float sg = warp_sum(g0 + g1), su = warp_sum(u0 + u1);
    if (lane == 0) {
        const float gv = sg + (bg ? bg[j] : 0.f), uv = su + (bu ? bu[j] : 0.f);
        a[i] = activate(act, gv) * uv;
    }
}

// grid: ceil(n / 8) blocks of 256 threads (one warp per neuron). gate_ptr null: no gate.
#define FFN_KERNELS(T, S)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                                                      \
        ffn_gate_up_##S(const T *G, const T *U, const float *bg, const float *bu, const float *x, int d,                   \
                        const unsigned *idx, const unsigned *count_ptr, const float *gate_ptr,                             \
                        unsigned long long *counters, unsigned n, int act, int vec, float *a) {                            \
        ffn_gate_up_impl<T>(G, U, bg, bu, x, d, idx, count_ptr, gate_ptr, counters, n, act, vec, a);                       \
    }

FFN_KERNELS(float, f32)
FFN_KERNELS(__nv_bfloat16, bf16)
FFN_KERNELS(__half, f16)
