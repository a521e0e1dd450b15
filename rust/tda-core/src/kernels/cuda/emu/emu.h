// A CPU emulation of the CUDA features the kernels use, to run the real .cu sources on a machine
// without a GPU (tests.cpp). Each block runs as blockDim OS threads with a std::barrier for
// __syncthreads and one per warp for the shuffles; blocks run one after another, so `__shared__`
// becomes a function-static array. Only for checking index arithmetic and semantics: it is slow,
// and it does not model the memory model of a GPU beyond what barriers guarantee.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstddef>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
extern float *emu_dyn_smem;

struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

struct __nv_bfloat16 { uint16_t b = 0; };
struct __half { uint16_t b = 0; };
struct __half2 { __half x, y; };

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __bfloat162float(__nv_bfloat16 v) { return __uint_as_float((unsigned)v.b << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    unsigned u = __float_as_uint(f);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) { r.b = 0x7fc0; return r; }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.b = (uint16_t)(u >> 16);
    return r;
}
inline float __half2float(__half h) { _Float16 x; std::memcpy(&x, &h.b, 2); return (float)x; }
inline __half __float2half_rn(float f) { _Float16 x = (_Float16)f; __half h; std::memcpy(&h.b, &x, 2); return h; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }

template <class T> inline T __ldg(const T *p) { return *p; }
template <class T> inline T min(T a, T b) { return a < b ? a : b; }
template <class T> inline T max(T a, T b) { return a > b ? a : b; }

void __syncthreads();
void emu_shfl_exchange(const void *v, void *out, int src_lane, size_t bytes);
int emu_lane();

template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { T r; emu_shfl_exchange(&v, &r, emu_lane() ^ o, sizeof(T)); return r; }
template <class T> inline T __shfl_sync(unsigned, T v, int src) { T r; emu_shfl_exchange(&v, &r, src & 31, sizeof(T)); return r; }
template <class T> inline T __shfl_up_sync(unsigned, T v, int o) {
    T r;
    const int l = emu_lane();
    emu_shfl_exchange(&v, &r, l >= o ? l - o : l, sizeof(T));
    return r;
}

inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicMax(unsigned *p, unsigned v) {
    unsigned cur = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (cur < v && !__atomic_compare_exchange_n(p, &cur, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return cur;
}
