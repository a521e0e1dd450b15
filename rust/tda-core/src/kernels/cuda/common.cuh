// Shared helpers of the CUDA kernels: weight element types and their widening to f32, 16-byte
// vector loads, and warp / block reductions in a fixed order (every reduction here is a
// shuffle tree or a loop in index order, never an atomic on floats, so results repeat run to run).
//
// Weight matrices are f32, bf16 or f16; every kernel that reads weights is a template over the
// element type `T` and is instantiated three times with the suffixes `_f32`, `_bf16`, `_f16`.
// Activations and accumulators are always f32. No `--use_fast_math`: expf / tanhf / sqrtf are the
// IEEE-accurate versions, for parity with the CPU reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu

// ---- element types ---------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Elements of T in one 16-byte vector.
template <typename T> struct Vec16 { static constexpr int N = 16 / sizeof(T); };

// Widens the elements of one 16-byte vector (4 f32 or 8 bf16/f16) into `out`.
__device__ __forceinline__ void unpack(const uint4 &v, float *out, float) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
}

__device__ __forceinline__ void unpack_bf16x2(uint32_t w, float *out) {
    // bf16 -> f32 is exact: the bf16 bits are the high half of the f32 bits. Element 0 is the low half.
    out[0] = __uint_as_float(w << 16);
    out[1] = __uint_as_float(w & 0xffff0000u);
}

__device__ __forceinline__ void unpack(const uint4 &v, float *out, __nv_bfloat16) {
    unpack_bf16x2(v.x, out + 0);
    unpack_bf16x2(v.y, out + 2);
    unpack_bf16x2(v.z, out + 4);
    unpack_bf16x2(v.w, out + 6);
}

__device__ __forceinline__ void unpack_f16x2(uint32_t w, float *out) {
    __half2 h = *reinterpret_cast<const __half2 *>(&w);
    float2 f = __half22float2(h);
    out[0] = f.x;
    out[1] = f.y;
}

__device__ __forceinline__ void unpack(const uint4 &v, float *out, __half) {
    unpack_f16x2(v.x, out + 0);
    unpack_f16x2(v.y, out + 2);
    unpack_f16x2(v.z, out + 4);
    unpack_f16x2(v.w, out + 6);
}

// Read-only 16-byte load of weights (through the non-coherent cache path).
__device__ __forceinline__ uint4 ld_vec(const void *p) { return __ldg(reinterpret_cast<const uint4 *>(p)); }

// The dot product of one 16-byte weight vector with the matching N floats of x (16-byte aligned).
template <typename T> __device__ __forceinline__ float dot_vec(const uint4 &w, const float *__restrict__ x) {
    constexpr int N = Vec16<T>::N;
    float wf[N];
    unpack(w, wf, T());
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < N; i += 4) {
        const float4 xv = __ldg(reinterpret_cast<const float4 *>(x + i));
        s += wf[i] * xv.x + wf[i + 1] * xv.y + wf[i + 2] * xv.z + wf[i + 3] * xv.w;
    }
    return s;
}

// ---- reductions --------------------------------------------------------------------------------

struct SumOp {
    template <class T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    template <class T> __device__ __forceinline__ T operator()(T a, T b) const { return fmaxf(a, b); }
};

template <class T, class Op> __device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// `op` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `sh` holds at least 33 values of shared memory; `identity` fills the missing warps. Ends with a
// barrier, so `sh` can be reused.
template <class T, class Op> __device__ __forceinline__ T block_reduce(T v, T *sh, T identity, Op op) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_reduce(v, op);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        T t = lane < nw ? sh[lane] : identity;
        t = warp_reduce(t, op);
        if (lane == 0) sh[32] = t;
    }
    __syncthreads();
    const T r = sh[32];
    __syncthreads();
    return r;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp{}); }
__device__ __forceinline__ double warp_sum_d(double v) { return warp_reduce(v, SumOp{}); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, MaxOp{}); }
__device__ __forceinline__ float block_sum(float v, float *sh) { return block_reduce(v, sh, 0.f, SumOp{}); }
__device__ __forceinline__ double block_sum_d(double v, double *sh) { return block_reduce(v, sh, 0.0, SumOp{}); }
__device__ __forceinline__ float block_max(float v, float *sh) { return block_reduce(v, sh, -INFINITY, MaxOp{}); }

// Adds a block's passing neurons (`passed` per thread) and, from block 0, `rows` token rows to a
// gated FFN layer's counters `[rows, passed]` (u64): one atomic per block (integers: the totals do
// not depend on the order). Every thread of the block calls it (a barrier).
__device__ __forceinline__ void count_gated(unsigned passed, unsigned rows, unsigned long long *counters) {
    __shared__ unsigned sh[33];
    passed = block_reduce(passed, sh, 0u, SumOp{});
    if (threadIdx.x == 0) {
        if (passed) atomicAdd(counters + 1, (unsigned long long)passed);
        if (blockIdx.x == 0) atomicAdd(counters, (unsigned long long)rows);
    }
}

// ---- row dot products (one warp per row) -------------------------------------------------------

// `w . x` over `cols` values of one row, by one warp (gemv.cu's header has the why of the loads).
// The sum ends in every lane with the same bits (a butterfly), so a warp can branch on it.
// Vector path, for rows that start 16-byte aligned: four independent 16-byte loads per lane.
template <typename T>
__device__ __forceinline__ float row_dot_vec(const T *__restrict__ w, const float *__restrict__ x, int cols, int lane) {
    constexpr int N = Vec16<T>::N;
    const uint4 *wv = reinterpret_cast<const uint4 *>(w);
    const int nv = cols / N;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int v = lane;
    for (; v + 96 < nv; v += 128) {
        const uint4 w0 = ld_vec(wv + v), w1 = ld_vec(wv + v + 32), w2 = ld_vec(wv + v + 64), w3 = ld_vec(wv + v + 96);
        a0 += dot_vec<T>(w0, x + (size_t)v * N);
        a1 += dot_vec<T>(w1, x + (size_t)(v + 32) * N);
        a2 += dot_vec<T>(w2, x + (size_t)(v + 64) * N);
        a3 += dot_vec<T>(w3, x + (size_t)(v + 96) * N);
    }
    for (; v < nv; v += 32) a0 += dot_vec<T>(ld_vec(wv + v), x + (size_t)v * N);
    return warp_sum((a0 + a1) + (a2 + a3));
}

// Scalar path (a row whose byte length is not a multiple of 16): lane-strided, still coalesced.
template <typename T>
__device__ __forceinline__ float row_dot_scalar(const T *__restrict__ w, const float *__restrict__ x, int cols, int lane) {
    float a0 = 0.f, a1 = 0.f;
    int c = lane;
    for (; c + 32 < cols; c += 64) {
        a0 += to_f32(w[c]) * __ldg(x + c);
        a1 += to_f32(w[c + 32]) * __ldg(x + c + 32);
    }
    for (; c < cols; c += 32) a0 += to_f32(w[c]) * __ldg(x + c);
    return warp_sum(a0 + a1);
}

template <typename T>
__device__ __forceinline__ float row_dot(const T *__restrict__ w, const float *__restrict__ x, int cols, int vec, int lane) {
    return vec ? row_dot_vec<T>(w, x, cols, lane) : row_dot_scalar<T>(w, x, cols, lane);
}

// ---- activations (the CPU's formulas, in the same order of operations) -------------------------

// act 0: silu, act 1: gelu (tanh approximation).
__device__ __forceinline__ float activate(int act, float x) {
    if (act == 0) return x / (1.0f + expf(-x));
    const float c = 0.7978846f;  // sqrt(2 / pi), as the CPU's f32 constant
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}
