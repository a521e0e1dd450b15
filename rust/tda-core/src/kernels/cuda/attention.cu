// Attention over the f32 KV cache (`capacity x kv_dim` per layer), with grouped KV heads (query
// head h reads KV head h / group), a sliding window (a query at position p sees keys j with
// p - W < j <= p), and soft-capping of the scaled scores (cap * tanh(s / cap), before masking).
// The first position of the step (`start`) is read from device memory, so that a recorded graph
// replays for every later token.
//
// kv_write: the step's keys and values into the cache at positions start .. start + rows.
//
// Decode (one row), flash-decoding: grid (kv_heads, splits), splits fixed by the cache capacity
// (DEC_SPLIT positions each), so the grid does not change from token to token; blocks whose
// positions are not visible write an empty partial and leave. A block scores its positions for all
// the query heads of its KV head at once (one thread per position reads the key row once), takes
// the split's softmax (max, exponentials, sum per head), then accumulates the value rows
// (coalesced over head_dim). attn_combine merges the splits of each head (rescaled by their maxima).
//
// Prefill (many rows): grid (ceil(rows / 32), heads); each of the 8 warps of a block owns 4 query
// rows. Key and value tiles of 32 positions go through shared memory; a lane scores one key of the
// tile for the warp's 4 rows, the warp then updates each row's online softmax once per tile and
// accumulates the values (a lane owns head_dim / 32 columns). No rows x positions score matrix.
#include "common.cuh"

#define DEC_SPLIT 256  // positions per decode block = its thread count
#define DEC_MAXG 8     // query heads accumulated together per pass
#define PF_ROWS 4      // query rows per warp (prefill)
#define PF_BQ 32       // query rows per block (8 warps x PF_ROWS)
#define PF_BK 32       // keys per tile
#define PF_MAXC 8      // columns per lane: head_dim <= 256

// First visible position of a query at position p (window 0: no window).
__device__ __forceinline__ unsigned visible_lo(unsigned p, unsigned window) {
    return (window != 0 && p + 1 > window) ? p + 1 - window : 0;
}

__device__ __forceinline__ float cap_score(float s, float softcap) {
    return softcap > 0.f ? tanhf(s / softcap) * softcap : s;
}

extern "C" __global__ void kv_write(const float *__restrict__ k, const float *__restrict__ v, float *__restrict__ kc,
                                    float *__restrict__ vc, const unsigned *__restrict__ start_ptr, unsigned rows,
                                    unsigned kvd, unsigned capacity) {
    const unsigned start = *start_ptr;
    const size_t total = (size_t)rows * kvd;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const size_t i = e / kvd;
        const size_t pos = start + i;
        if (pos >= capacity) continue;
        const size_t dst = pos * kvd + (e - i * kvd);
        kc[dst] = k[e];
        vc[dst] = v[e];
    }
}

// Dynamic shared memory: (group * hd + group * DEC_SPLIT + DEC_MAXG * DEC_SPLIT + 2 * group) floats.
// Needs hd <= DEC_SPLIT. part_o: heads x splits x hd, part_ml: heads x splits x 2 (max, sum).
extern "C" __global__ void __launch_bounds__(DEC_SPLIT)
    attn_decode(const float *__restrict__ q, const float *__restrict__ kc, const float *__restrict__ vc,
                const unsigned *__restrict__ start_ptr, int heads, int kv_heads, int hd, float scale, float softcap,
                unsigned window, float *__restrict__ part_o, float *__restrict__ part_ml) {
    extern __shared__ float smem[];
    const int group = heads / kv_heads;
    const int kvh = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const size_t kvd = (size_t)kv_heads * hd;
    const unsigned p = *start_ptr;
    const unsigned lo = visible_lo(p, window);
    const unsigned s0 = (unsigned)split * DEC_SPLIT;
    const unsigned a = max(s0, lo), e = min(s0 + DEC_SPLIT, p + 1);  // visible positions of this block: [a, e)
    const int t = threadIdx.x;
    if (a >= e) {
        for (int g = t; g < group; g += blockDim.x) {
            const size_t at = ((size_t)(kvh * group + g) * splits + split) * 2;
            part_ml[at] = -INFINITY;
            part_ml[at + 1] = 0.f;
        }
        return;
    }
    float *qs = smem;                        // group x hd
    float *ws = qs + group * hd;             // group x DEC_SPLIT: scores, then softmax numerators
    float *red = ws + group * DEC_SPLIT;     // DEC_MAXG x DEC_SPLIT: partial value sums
    float *mls = red + DEC_MAXG * DEC_SPLIT; // group x 2
    for (int i = t; i < group * hd; i += blockDim.x) qs[i] = q[(size_t)kvh * group * hd + i];
    __syncthreads();

    // Scores: thread t takes position s0 + t.
    const unsigned j = s0 + t;
    const bool valid = j >= a && j < e;
    const float *krow = kc + (size_t)j * kvd + (size_t)kvh * hd;
    for (int g0 = 0; g0 < group; g0 += DEC_MAXG) {
        const int gn = min(DEC_MAXG, group - g0);
        float acc[DEC_MAXG];
#pragma unroll
        for (int g = 0; g < DEC_MAXG; ++g) acc[g] = 0.f;
        if (valid) {
            if ((hd & 3) == 0) {
                for (int c = 0; c < hd; c += 4) {
                    const float4 kv = *reinterpret_cast<const float4 *>(krow + c);
#pragma unroll
                    for (int g = 0; g < DEC_MAXG; ++g)
                        if (g < gn) {
                            const float *qg = qs + (g0 + g) * hd + c;
                            acc[g] += qg[0] * kv.x + qg[1] * kv.y + qg[2] * kv.z + qg[3] * kv.w;
                        }
                }
            } else {
                for (int c = 0; c < hd; ++c) {
                    const float kv = krow[c];
#pragma unroll
                    for (int g = 0; g < DEC_MAXG; ++g)
                        if (g < gn) acc[g] += qs[(g0 + g) * hd + c] * kv;
                }
            }
        }
#pragma unroll
        for (int g = 0; g < DEC_MAXG; ++g)
            if (g < gn) ws[(g0 + g) * DEC_SPLIT + t] = valid ? cap_score(acc[g] * scale, softcap) : -INFINITY;
    }
    __syncthreads();

    // Softmax of the split, one warp per head.
    const int warp = t >> 5, lane = t & 31, nwarps = blockDim.x >> 5;
    for (int g = warp; g < group; g += nwarps) {
        float *wg = ws + g * DEC_SPLIT;
        float m = -INFINITY;
        for (int i = lane; i < DEC_SPLIT; i += 32) m = fmaxf(m, wg[i]);
        m = warp_max(m);
        float l = 0.f;
        for (int i = lane; i < DEC_SPLIT; i += 32) {
            const float s = wg[i];
            const float w = s == -INFINITY ? 0.f : expf(s - m);
            wg[i] = w;
            l += w;
        }
        l = warp_sum(l);
        if (lane == 0) {
            mls[2 * g] = m;
            mls[2 * g + 1] = l;
        }
    }
    __syncthreads();

    // Values: thread t takes column t % hd of every R-th position (R = DEC_SPLIT / hd slices).
    const int R = max(1, (int)blockDim.x / hd);
    const int c = t % hd, r = t / hd;
    const bool active = r < R;
    for (int g0 = 0; g0 < group; g0 += DEC_MAXG) {
        const int gn = min(DEC_MAXG, group - g0);
        float acc[DEC_MAXG];
#pragma unroll
        for (int g = 0; g < DEC_MAXG; ++g) acc[g] = 0.f;
        if (active) {
            for (unsigned jj = a + r; jj < e; jj += R) {
                const float vv = vc[(size_t)jj * kvd + (size_t)kvh * hd + c];
                const unsigned at = jj - s0;
#pragma unroll
                for (int g = 0; g < DEC_MAXG; ++g)
                    if (g < gn) acc[g] += ws[(g0 + g) * DEC_SPLIT + at] * vv;
            }
#pragma unroll
            for (int g = 0; g < DEC_MAXG; ++g)
                if (g < gn) red[(r * DEC_MAXG + g) * hd + c] = acc[g];
        }
        __syncthreads();
        if (active && r == 0) {
            for (int g = 0; g < gn; ++g) {
                float o = red[g * hd + c];
                for (int rr = 1; rr < R; ++rr) o += red[(rr * DEC_MAXG + g) * hd + c];
                const int h = kvh * group + g0 + g;
                part_o[((size_t)h * splits + split) * hd + c] = o;
            }
        }
        __syncthreads();
    }
    for (int g = t; g < group; g += blockDim.x) {
        const size_t at = ((size_t)(kvh * group + g) * splits + split) * 2;
        part_ml[at] = mls[2 * g];
        part_ml[at + 1] = mls[2 * g + 1];
    }
}

// grid: heads blocks; ctx[h * hd + c] = sum_s o_s[c] e^(m_s - M) / sum_s l_s e^(m_s - M) over the
// splits that hold visible positions.
extern "C" __global__ void __launch_bounds__(128)
    attn_combine(const float *__restrict__ part_o, const float *__restrict__ part_ml, const unsigned *__restrict__ start_ptr,
                 int hd, unsigned window, int splits, float *__restrict__ ctx) {
    const int h = blockIdx.x;
    const unsigned p = *start_ptr;
    const int s_lo = (int)(visible_lo(p, window) / DEC_SPLIT);
    const int s_hi = min((int)(p / DEC_SPLIT), splits - 1);
    const float *ml = part_ml + (size_t)h * splits * 2;
    float M = -INFINITY;
    for (int s = s_lo; s <= s_hi; ++s) M = fmaxf(M, ml[2 * s]);
    float L = 0.f;
    for (int s = s_lo; s <= s_hi; ++s)
        if (ml[2 * s] != -INFINITY) L += ml[2 * s + 1] * expf(ml[2 * s] - M);
    const float inv = 1.0f / L;
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        float o = 0.f;
        for (int s = s_lo; s <= s_hi; ++s)
            if (ml[2 * s] != -INFINITY) o += part_o[((size_t)h * splits + s) * hd + c] * expf(ml[2 * s] - M);
        ctx[(size_t)h * hd + c] = o * inv;
    }
}

// Dynamic shared memory: (PF_BQ * hd + PF_BK * (hd + 4) + PF_BK * hd) floats. Needs hd <= 256.
extern "C" __global__ void __launch_bounds__(256)
    attn_prefill(const float *__restrict__ q, const float *__restrict__ kc, const float *__restrict__ vc,
                 const unsigned *__restrict__ start_ptr, int rows, int heads, int kv_heads, int hd, float scale,
                 float softcap, unsigned window, float *__restrict__ ctx) {
    extern __shared__ float smem[];
    const int KS = hd + 4;  // padded key row: 16-byte aligned, conflict-free float4 reads across lanes
    float *qs = smem;                 // PF_BQ x hd
    float *ks = qs + PF_BQ * hd;      // PF_BK x KS
    float *vs = ks + PF_BK * KS;      // PF_BK x hd
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const size_t qd = (size_t)heads * hd, kvd = (size_t)kv_heads * hd;
    const unsigned start = *start_ptr;
    const int i0 = blockIdx.x * PF_BQ;
    const int nrows = min(PF_BQ, rows - i0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int x = threadIdx.x; x < PF_BQ * hd; x += blockDim.x) {
        const int r = x / hd, c = x - r * hd;
        qs[x] = r < nrows ? q[(size_t)(i0 + r) * qd + (size_t)h * hd + c] : 0.f;
    }
    const unsigned k_begin = visible_lo(start + i0, window), k_end = start + i0 + nrows;  // keys of the block

    const int r_base = warp * PF_ROWS;
    bool rv[PF_ROWS];
    unsigned pr[PF_ROWS], lr[PF_ROWS];
    float o[PF_ROWS][PF_MAXC], m[PF_ROWS], l[PF_ROWS];
#pragma unroll
    for (int rr = 0; rr < PF_ROWS; ++rr) {
        rv[rr] = r_base + rr < nrows;
        pr[rr] = start + i0 + r_base + rr;
        lr[rr] = visible_lo(pr[rr], window);
        m[rr] = -INFINITY;
        l[rr] = 0.f;
#pragma unroll
        for (int k = 0; k < PF_MAXC; ++k) o[rr][k] = 0.f;
    }

    for (unsigned t0 = k_begin; t0 < k_end; t0 += PF_BK) {
        __syncthreads();  // the previous tile is consumed (first round: q is loaded)
        const int nk = (int)min((unsigned)PF_BK, k_end - t0);
        for (int x = threadIdx.x; x < PF_BK * hd; x += blockDim.x) {
            const int kk = x / hd, c = x - kk * hd;
            float kv = 0.f, vv = 0.f;
            if (kk < nk) {
                const size_t off = (size_t)(t0 + kk) * kvd + (size_t)kvh * hd + c;
                kv = kc[off];
                vv = vc[off];
            }
            ks[kk * KS + c] = kv;
            vs[kk * hd + c] = vv;
        }
        __syncthreads();

        // Scores of key t0 + lane for the warp's rows.
        float s[PF_ROWS];
#pragma unroll
        for (int rr = 0; rr < PF_ROWS; ++rr) s[rr] = 0.f;
        const float *kr = ks + lane * KS;
        if ((hd & 3) == 0) {
            for (int c = 0; c < hd; c += 4) {
                const float4 kv = *reinterpret_cast<const float4 *>(kr + c);
#pragma unroll
                for (int rr = 0; rr < PF_ROWS; ++rr) {
                    const float4 qv = *reinterpret_cast<const float4 *>(qs + (r_base + rr) * hd + c);
                    s[rr] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
                }
            }
        } else {
            for (int c = 0; c < hd; ++c) {
                const float kv = kr[c];
#pragma unroll
                for (int rr = 0; rr < PF_ROWS; ++rr) s[rr] += qs[(r_base + rr) * hd + c] * kv;
            }
        }
        const unsigned j = t0 + lane;
#pragma unroll
        for (int rr = 0; rr < PF_ROWS; ++rr) {
            const bool vis = rv[rr] && lane < nk && j >= lr[rr] && j <= pr[rr];
            const float sc = cap_score(s[rr] * scale, softcap);
            s[rr] = vis ? sc : -INFINITY;
        }

        // Online softmax, once per tile and row (the tile maximum is the same on every lane).
#pragma unroll
        for (int rr = 0; rr < PF_ROWS; ++rr) {
            const float tm = warp_max(s[rr]);
            if (tm == -INFINITY) {
                s[rr] = 0.f;
                continue;
            }
            const float mn = fmaxf(m[rr], tm);
            const float corr = expf(m[rr] - mn);  // 0 while m is -inf
            const float pw = s[rr] == -INFINITY ? 0.f : expf(s[rr] - mn);
            l[rr] = l[rr] * corr + warp_sum(pw);
#pragma unroll
            for (int k = 0; k < PF_MAXC; ++k) o[rr][k] *= corr;
            m[rr] = mn;
            s[rr] = pw;
        }

        // Values.
        for (int kk = 0; kk < nk; ++kk) {
            float pk[PF_ROWS];
#pragma unroll
            for (int rr = 0; rr < PF_ROWS; ++rr) pk[rr] = __shfl_sync(FULL_MASK, s[rr], kk);
            const float *vr = vs + kk * hd;
#pragma unroll
            for (int k = 0; k < PF_MAXC; ++k) {
                const int c = lane + 32 * k;
                if (c < hd) {
                    const float vv = vr[c];
#pragma unroll
                    for (int rr = 0; rr < PF_ROWS; ++rr) o[rr][k] += pk[rr] * vv;
                }
            }
        }
    }

#pragma unroll
    for (int rr = 0; rr < PF_ROWS; ++rr) {
        if (!rv[rr]) continue;
        const float inv = 1.0f / l[rr];
        float *out = ctx + (size_t)(i0 + r_base + rr) * qd + (size_t)h * hd;
#pragma unroll
        for (int k = 0; k < PF_MAXC; ++k) {
            const int c = lane + 32 * k;
            if (c < hd) out[c] = o[rr][k] * inv;
        }
    }
}
