// Token choice on the device, one block of 1024 threads; only the chosen id (4 bytes) goes back.
//
// argmax: the first index of the largest value (NaN never wins).
//
// sample: the CPU sampler's draw (generate/sampler.rs) without sorting the vocabulary:
//   l_i = x_i * (1 / temperature)
//   1. top-k: the k-th largest l by an MSB-first radix select on order-preserving keys of the
//      float bits (4 passes of 8 bits, integer histograms); candidates are the keys above it, plus
//      the first of the keys equal to it in index order, k in all.
//   2. softmax over the candidates: e_i = exp(l_i - max), p_i = e_i / sum (the sum in f64, p_i
//      rounded to f32 as the CPU does).
//   3. top-p: the smallest most-likely prefix of mass >= top_p is every p above a threshold V plus
//      some of the p equal to V (in index order); V is found by a radix search over the bits of p
//      (non-negative floats order as their bits) on masses in 2^-40 fixed point, which add exactly
//      in any order, so the shared-memory histograms are deterministic.
//   4. min-p: keep p >= min_p * p_max (p_max belongs to the largest logit: p_max = 1 / sum).
//   5. draw: r = u * (kept mass); each thread owns a contiguous chunk of indices, an exclusive
//      scan of the chunks' kept masses finds the chunk holding r, whose thread walks it in index
//      order to the first index where the running mass passes r.
// Every step is a fixed-order reduction, an integer histogram or a scan: the same logits and u
// give the same token every time.
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define FX_ONE 1099511627776.0  // 2^40

__device__ __forceinline__ unsigned order_key(float f) {
    const unsigned b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ unsigned long long fixed(float p) { return (unsigned long long)((double)p * FX_ONE); }

// Exclusive prefix sum of one value per thread, in thread order; `total` gets the sum. `sh` holds
// 33 values. Ends with a barrier.
__device__ __forceinline__ unsigned long long block_exclusive_scan(unsigned long long v, unsigned long long *sh,
                                                                   unsigned long long *total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    unsigned long long x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long y = __shfl_up_sync(FULL_MASK, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) sh[warp] = x;
    __syncthreads();
    if (warp == 0) {
        unsigned long long w = lane < nw ? sh[lane] : 0ull;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned long long y = __shfl_up_sync(FULL_MASK, w, o);
            if (lane >= o) w += y;
        }
        if (lane < nw) sh[lane] = w;
        if (lane == 31) sh[32] = w;
    }
    __syncthreads();
    const unsigned long long excl = x - v + (warp > 0 ? sh[warp - 1] : 0ull);
    *total = sh[32];
    __syncthreads();
    return excl;
}

// The better of two (value, index) candidates: larger value, then smaller index.
__device__ __forceinline__ void better(float &bv, unsigned &bi, float v, unsigned i) {
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) argmax_f32(const float *__restrict__ x, unsigned len,
                                                                        unsigned *__restrict__ out) {
    __shared__ float sv[32];
    __shared__ unsigned si[32];
    float bv = -INFINITY;
    unsigned bi = 0xffffffffu;
    for (unsigned i = threadIdx.x; i < len; i += blockDim.x) better(bv, bi, x[i], i);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(FULL_MASK, bv, o);
        const unsigned i = __shfl_xor_sync(FULL_MASK, bi, o);
        better(bv, bi, v, i);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        bv = lane < nw ? sv[lane] : -INFINITY;
        bi = lane < nw ? si[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float v = __shfl_xor_sync(FULL_MASK, bv, o);
            const unsigned i = __shfl_xor_sync(FULL_MASK, bi, o);
            better(bv, bi, v, i);
        }
        if (lane == 0) out[0] = bi == 0xffffffffu ? 0u : bi;
    }
}

// `work` holds len floats of scratch; out[0] receives the token.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_f32(const float *__restrict__ x, unsigned len, float inv_t, unsigned top_k, float top_p, float min_p, float u,
               float *__restrict__ work, unsigned *__restrict__ out) {
    __shared__ unsigned hist[256];
    __shared__ unsigned long long hist64[256];
    __shared__ unsigned long long sh64[33];
    __shared__ float shf[33];
    __shared__ double shd[33];
    __shared__ unsigned sel;
    __shared__ unsigned long long sel64;
    __shared__ unsigned pick, last;

    const unsigned tid = threadIdx.x, nt = blockDim.x;
    const unsigned chunk = (len + nt - 1) / nt;
    const unsigned b = min(tid * chunk, len), e = min(b + chunk, len);  // this thread's indices, in order

    // The largest scaled logit.
    float mx = -INFINITY;
    for (unsigned i = b; i < e; ++i) mx = fmaxf(mx, x[i] * inv_t);
    mx = block_max(mx, shf);

    // 1. top-k: T is the k-th largest key; keep keys > T and the first `krem` keys == T.
    const bool use_k = top_k > 0 && top_k < len;
    unsigned T = 0, krem = 0;
    if (use_k) {
        unsigned prefix = 0, pmask = 0, k = top_k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            if (tid < 256) hist[tid] = 0;
            __syncthreads();
            for (unsigned i = tid; i < len; i += nt) {
                const unsigned key = order_key(x[i] * inv_t);
                if ((key & pmask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                // The digit whose bucket holds the k-th largest of the keys still in play.
                unsigned cum = 0;
                int d = 255;
                for (; d > 0; --d) {
                    if (cum + hist[d] >= k) break;
                    cum += hist[d];
                }
                sel = (unsigned)d;
                sel64 = k - cum;
            }
            __syncthreads();
            prefix |= sel << shift;
            pmask |= 255u << shift;
            k = (unsigned)sel64;
            __syncthreads();
        }
        T = prefix;
        krem = k;
    }
    unsigned long long eq_base = 0, tot = 0;
    if (use_k) {
        unsigned long long c = 0;
        for (unsigned i = b; i < e; ++i) c += order_key(x[i] * inv_t) == T;
        eq_base = block_exclusive_scan(c, sh64, &tot);
    }

    // 2. Softmax numerators of the candidates (0 for the others), then probabilities.
    double s = 0.0;
    {
        unsigned long long r = eq_base;
        for (unsigned i = b; i < e; ++i) {
            const float l = x[i] * inv_t;
            bool cand = true;
            if (use_k) {
                const unsigned key = order_key(l);
                cand = key > T || (key == T && r++ < krem);
            }
            const float ev = cand ? expf(l - mx) : 0.f;
            work[i] = ev;
            s += (double)ev;
        }
    }
    const double total = block_sum_d(s, shd);
    for (unsigned i = b; i < e; ++i) work[i] = (float)((double)work[i] / total);
    __syncthreads();

    // 3. top-p: keep p > V, and the first `pties` of the p == V.
    const bool use_p = top_p < 1.0f;
    unsigned V = 0;
    unsigned long long pties = ~0ull;
    if (use_p) {
        // At least one unit, so that a top_p of 0 keeps the most likely token (as the CPU does).
        const unsigned long long target = max((unsigned long long)((double)top_p * FX_ONE), 1ull);
        unsigned prefix = 0, pmask = 0;
        unsigned long long above = 0;  // mass of the p above every value still in play
        bool found = true;
        for (int shift = 24; shift >= 0 && found; shift -= 8) {
            if (tid < 256) hist64[tid] = 0;
            __syncthreads();
            for (unsigned i = tid; i < len; i += nt) {
                const float p = work[i];
                if (p > 0.f) {
                    const unsigned bits = __float_as_uint(p);
                    if ((bits & pmask) == prefix) atomicAdd(&hist64[(bits >> shift) & 255u], fixed(p));
                }
            }
            __syncthreads();
            if (tid == 0) {
                // The largest digit whose bucket brings the mass from the top up to the target.
                unsigned long long cum = above;
                int d = 255;
                for (; d >= 0; --d) {
                    if (cum + hist64[d] >= target) break;
                    cum += hist64[d];
                }
                sel = d < 0 ? 0xffffffffu : (unsigned)d;
                sel64 = cum;
            }
            __syncthreads();
            if (sel == 0xffffffffu) {
                found = false;
            } else {
                prefix |= sel << shift;
                pmask |= 255u << shift;
                above = sel64;
            }
            __syncthreads();
        }
        if (found) {
            V = prefix;
            const unsigned long long fv = fixed(__uint_as_float(V));
            pties = fv > 0 ? (target - above + fv - 1) / fv : ~0ull;
        }
        // Not found: the candidates' mass falls short of top_p (rounding); V = 0 keeps them all.
    }

    // 4. min-p floor.
    const float ptop = (float)(1.0 / total);
    const bool use_min = min_p > 0.f;
    const float floor_p = min_p * ptop;

    unsigned long long tie_base = 0;
    if (use_p) {
        unsigned long long c = 0;
        for (unsigned i = b; i < e; ++i) {
            const float p = work[i];
            c += p > 0.f && __float_as_uint(p) == V;
        }
        tie_base = block_exclusive_scan(c, sh64, &tot);
    }

    // 5. The draw.
    if (tid == 0) {
        pick = 0xffffffffu;
        last = 0;
    }
    // Whether probability p (> 0) is a candidate: in the top-p prefix (ties at its edge taken in
    // index order, `r` counting this thread's ties) and above the min-p floor.
    auto candidate = [&](float p, unsigned long long &r) {
        const unsigned bits = __float_as_uint(p);
        const bool in_p = !use_p || bits > V || (bits == V && r++ < pties);
        return in_p && (!use_min || p >= floor_p);
    };
    unsigned long long own = 0;
    {
        unsigned long long r = tie_base;
        unsigned my_last = 0;
        bool any = false;
        for (unsigned i = b; i < e; ++i) {
            const float p = work[i];
            if (!(p > 0.f)) continue;
            if (candidate(p, r)) {
                own += fixed(p);
                my_last = i;
                any = true;
            }
        }
        __syncthreads();
        if (any) atomicMax(&last, my_last);
    }
    unsigned long long mass = 0;
    const unsigned long long base = block_exclusive_scan(own, sh64, &mass);
    const unsigned long long target = (unsigned long long)((double)u * (double)mass);
    if (own > 0 && target >= base && target < base + own) {
        unsigned long long c = base, r = tie_base;
        for (unsigned i = b; i < e; ++i) {
            const float p = work[i];
            if (!(p > 0.f)) continue;
            if (candidate(p, r)) {
                c += fixed(p);
                if (target < c) {
                    pick = i;
                    break;
                }
            }
        }
    }
    __syncthreads();
    if (tid == 0) out[0] = pick != 0xffffffffu ? pick : last;
}
