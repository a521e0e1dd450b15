//! x86-64 versions of the decode kernels' inner loops, for AVX2 + FMA (+ F16C) and for AVX-512F:
//! dot products of a weight row (f32, bf16 or f16) with f32 activations, `y += a * row`, and a
//! plain sum (the streaming read of the bandwidth probe). Half-precision rows are widened in
//! registers, never through a buffer. Callers check the CPU features first ([`super::kernels`]).
//!
//! Each loop also prefetches [`PREFETCH_AHEAD`] bytes ahead of its loads, running on from the end
//! of its row into `next`, the row the caller reads after it (the following row for a GEMV, the
//! next kept neuron's row for a sparse FFN): the rows of a sparse set then stream like one
//! contiguous array, and no byte is fetched in vain.

use super::PREFETCH_AHEAD;

/// Prefetches the `lines` cache lines `PREFETCH_AHEAD` bytes after element `i` of `row`, reading
/// on into `next` past the row's end.
#[inline(always)]
unsafe fn prefetch_ahead<T>(row: &[T], next: &[T], i: usize, lines: usize) {
    let size = std::mem::size_of::<T>();
    let (row_bytes, next_bytes) = (std::mem::size_of_val(row), std::mem::size_of_val(next));
    for l in 0..lines {
        let off = i * size + PREFETCH_AHEAD + 64 * l;
        if off < row_bytes {
            _mm_prefetch((row.as_ptr() as *const i8).add(off), _MM_HINT_T0);
        } else if off - row_bytes < next_bytes {
            _mm_prefetch((next.as_ptr() as *const i8).add(off - row_bytes), _MM_HINT_T0);
        }
    }
}

use half::{bf16, f16};
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// 8 bf16 values at `p` as f32 (bf16 is the top half of an f32).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load8_bf16(p: *const bf16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8_f16(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16_bf16(p: *const bf16) -> __m512 {
    let h = _mm256_loadu_si256(p as *const __m256i);
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16_f16(p: *const f16) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
}

/// AVX2 loops: 4 accumulators of 8 lanes, then 8 at a time, then scalar.
macro_rules! avx2 {
    ($dot:ident, $axpy:ident, $t:ty, $features:literal, $load:expr, $scalar:expr) => {
        /// `a . b`, prefetching on into `next`.
        /// # Safety
        /// The CPU must have the enabled features; `a.len() == b.len()`.
        #[target_feature(enable = $features)]
        pub unsafe fn $dot(a: &[$t], b: &[f32], next: &[$t]) -> f32 {
            let n = b.len();
            debug_assert_eq!(a.len(), n);
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                prefetch_ahead(a, next, i, 32 * std::mem::size_of::<$t>() / 64);
                for (k, s) in acc.iter_mut().enumerate() {
                    let o = i + 8 * k;
                    *s = _mm256_fmadd_ps($load(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *s);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps($load(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
            while i < n {
                s += $scalar(*a.get_unchecked(i)) * b[i];
                i += 1;
            }
            s
        }

        /// `y += a * x`, prefetching on into `next`.
        /// # Safety
        /// The CPU must have the enabled features; `x.len() == y.len()`.
        #[target_feature(enable = $features)]
        pub unsafe fn $axpy(a: f32, x: &[$t], y: &mut [f32], next: &[$t]) {
            let n = y.len();
            debug_assert_eq!(x.len(), n);
            let (px, py) = (x.as_ptr(), y.as_mut_ptr());
            let va = _mm256_set1_ps(a);
            let mut i = 0;
            while i + 32 <= n {
                prefetch_ahead(x, next, i, 32 * std::mem::size_of::<$t>() / 64);
                for k in 0..4 {
                    let o = i + 8 * k;
                    _mm256_storeu_ps(py.add(o), _mm256_fmadd_ps(va, $load(px.add(o)), _mm256_loadu_ps(py.add(o))));
                }
                i += 32;
            }
            while i + 8 <= n {
                _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(va, $load(px.add(i)), _mm256_loadu_ps(py.add(i))));
                i += 8;
            }
            while i < n {
                y[i] += a * $scalar(*x.get_unchecked(i));
                i += 1;
            }
        }
    };
}

avx2!(dot_f32, axpy_f32, f32, "avx2,fma", |p: *const f32| _mm256_loadu_ps(p), |v: f32| v);
avx2!(dot_bf16, axpy_bf16, bf16, "avx2,fma", |p| load8_bf16(p), |v: bf16| v.to_f32());
avx2!(dot_f16, axpy_f16, f16, "avx2,fma,f16c", |p| load8_f16(p), |v: f16| v.to_f32());

/// AVX-512 loops: 4 accumulators of 16 lanes, then 16 at a time; the last < 16 go to the AVX2 loop.
macro_rules! avx512 {
    ($dot:ident, $axpy:ident, $dot8:ident, $axpy8:ident, $t:ty, $load:expr) => {
        /// `a . b`, prefetching on into `next`.
        /// # Safety
        /// The CPU must have AVX-512F, AVX2, FMA and F16C; `a.len() == b.len()`.
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub unsafe fn $dot(a: &[$t], b: &[f32], next: &[$t]) -> f32 {
            let n = b.len();
            debug_assert_eq!(a.len(), n);
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i + 64 <= n {
                prefetch_ahead(a, next, i, 64 * std::mem::size_of::<$t>() / 64);
                for (k, s) in acc.iter_mut().enumerate() {
                    let o = i + 16 * k;
                    *s = _mm512_fmadd_ps($load(pa.add(o)), _mm512_loadu_ps(pb.add(o)), *s);
                }
                i += 64;
            }
            while i + 16 <= n {
                acc[0] = _mm512_fmadd_ps($load(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc[0]);
                i += 16;
            }
            let s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
            s + $dot8(&a[i..], &b[i..n], &[])
        }

        /// `y += a * x`, prefetching on into `next`.
        /// # Safety
        /// The CPU must have AVX-512F, AVX2, FMA and F16C; `x.len() == y.len()`.
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub unsafe fn $axpy(a: f32, x: &[$t], y: &mut [f32], next: &[$t]) {
            let n = y.len();
            debug_assert_eq!(x.len(), n);
            let (px, py) = (x.as_ptr(), y.as_mut_ptr());
            let va = _mm512_set1_ps(a);
            let mut i = 0;
            while i + 64 <= n {
                prefetch_ahead(x, next, i, 64 * std::mem::size_of::<$t>() / 64);
                for k in 0..4 {
                    let o = i + 16 * k;
                    _mm512_storeu_ps(py.add(o), _mm512_fmadd_ps(va, $load(px.add(o)), _mm512_loadu_ps(py.add(o))));
                }
                i += 64;
            }
            while i + 16 <= n {
                _mm512_storeu_ps(py.add(i), _mm512_fmadd_ps(va, $load(px.add(i)), _mm512_loadu_ps(py.add(i))));
                i += 16;
            }
            $axpy8(a, &x[i..], &mut y[i..n], &[]);
        }
    };
}

avx512!(dot_f32_512, axpy_f32_512, dot_f32, axpy_f32, f32, |p: *const f32| _mm512_loadu_ps(p));
avx512!(dot_bf16_512, axpy_bf16_512, dot_bf16, axpy_bf16, bf16, |p| load16_bf16(p));
avx512!(dot_f16_512, axpy_f16_512, dot_f16, axpy_f16, f16, |p| load16_f16(p));

/// Sum of `a`, 32 floats per iteration, prefetching like the other loops (the bandwidth probe's
/// read loop).
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn sum_f32(a: &[f32]) -> f32 {
    let (n, p) = (a.len(), a.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        prefetch_ahead(a, &[], i, 2);
        for (k, s) in acc.iter_mut().enumerate() {
            *s = _mm256_add_ps(*s, _mm256_loadu_ps(p.add(i + 8 * k)));
        }
        i += 32;
    }
    hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) + a[i..].iter().sum::<f32>()
}

/// Sum of `a`, 64 floats per iteration.
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn sum_f32_512(a: &[f32]) -> f32 {
    let (n, p) = (a.len(), a.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        prefetch_ahead(a, &[], i, 4);
        for (k, s) in acc.iter_mut().enumerate() {
            *s = _mm512_add_ps(*s, _mm512_loadu_ps(p.add(i + 16 * k)));
        }
        i += 64;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
        + a[i..].iter().sum::<f32>()
}

/// A bf16 row `a` against bf16 activations `x` with `vdpbf16ps`: each instruction multiplies 32
/// bf16 pairs exactly and adds them, pair by pair, into 16 f32 lanes (round to nearest even,
/// denormals flushed). 4 accumulators of 32 values, then 32 at a time, then scalar.
/// # Safety
/// The CPU must have AVX-512F and AVX512_BF16; `a.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn dot_bf16_dp(a: &[bf16], x: &[bf16], next: &[bf16]) -> f32 {
    let n = x.len();
    debug_assert_eq!(a.len(), n);
    let (pa, px) = (a.as_ptr(), x.as_ptr());
    let load = |p: *const bf16| -> __m512bh { std::mem::transmute(_mm512_loadu_si512(p as *const __m512i)) };
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 128 <= n {
        prefetch_ahead(a, next, i, 4);
        for (k, s) in acc.iter_mut().enumerate() {
            let o = i + 32 * k;
            *s = _mm512_dpbf16_ps(*s, load(pa.add(o)), load(px.add(o)));
        }
        i += 128;
    }
    while i + 32 <= n {
        acc[0] = _mm512_dpbf16_ps(acc[0], load(pa.add(i)), load(px.add(i)));
        i += 32;
    }
    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    while i < n {
        s += a.get_unchecked(i).to_f32() * x.get_unchecked(i).to_f32();
        i += 1;
    }
    s
}

/// Rows of the prefill GEMM's register tile ([`gemm_tile`]).
pub const TILE_ROWS: usize = 6;
/// Columns of the prefill GEMM's register tile: two vectors of 8.
pub const TILE_COLS: usize = 16;

/// One `6 x 16` tile of a matrix product: `c = [c +] sum_p a[p] b[p]^T` over `kc` steps, where
/// `a` is packed `[kc][6]` (six rows of activations, step by step) and `b` `[kc][16]` (sixteen
/// weight columns). The twelve accumulators stay in registers for the whole sum: each step is two
/// loads of `b`, six broadcasts of `a` and twelve fused multiply-adds, so the two FMA units stay
/// busy while every input comes from L1/L2.
/// # Safety
/// The CPU must have AVX2 and FMA; `a` holds `6 kc` floats, `b` `16 kc`, and `c` is valid for
/// reads and writes of 16 floats at each of the 6 rows `ldc` apart.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gemm_tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    let mut acc = [[_mm256_setzero_ps(); 2]; TILE_ROWS];
    for p in 0..kc {
        let (b0, b1) = (_mm256_loadu_ps(b.add(p * TILE_COLS)), _mm256_loadu_ps(b.add(p * TILE_COLS + 8)));
        let ap = a.add(p * TILE_ROWS);
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm256_broadcast_ss(&*ap.add(i));
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let ci = c.add(i * ldc);
        for (h, v) in row.iter().enumerate() {
            let v = if accumulate { _mm256_add_ps(*v, _mm256_loadu_ps(ci.add(8 * h))) } else { *v };
            _mm256_storeu_ps(ci.add(8 * h), v);
        }
    }
}

/// `out[t * ldo + j] = x_t . w_j` for `TM` rows of `x` and `JN` rows of `w` (rows of `k` values,
/// `k` a multiple of 16), `x`'s rows `ldx` apart and `w`'s `k` apart: the register tile of the
/// thin product, each output a 512-bit running dot product summed across its lanes at the end.
///
/// # Safety
/// The CPU must have AVX-512F; the rows must lie inside `x` and `w`, and `out` must be valid for
/// the writes.
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn thin_tile<const TM: usize, const JN: usize>(
    x: *const f32,
    ldx: usize,
    w: *const f32,
    k: usize,
    out: *mut f32,
    ldo: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); JN]; TM];
    let mut p = 0;
    while p < k {
        let wv: [__m512; JN] = core::array::from_fn(|j| _mm512_loadu_ps(w.add(j * k + p)));
        for (t, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_loadu_ps(x.add(t * ldx + p));
            for (a, wj) in row.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(*wj, xv, *a);
            }
        }
        p += 16;
    }
    for (t, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            *out.add(t * ldo + j) = _mm512_reduce_add_ps(*a);
        }
    }
}

/// Rows of `x` per register tile of the thin product, and rows of `w`.
pub const THIN_TM: usize = 4;
pub const THIN_JN: usize = 4;

/// `out (m x ldo, columns j0..j0 + nw) = x (m x k) . w^T` for `nw` rows of `w` (`k` values each,
/// a multiple of 16): [`thin_tile`]s of [`THIN_TM`] x [`THIN_JN`], the weight rows of a tile kept
/// in L1 while every row of `x` passes.
///
/// # Safety
/// The CPU must have AVX-512F; `x` holds `m * k` values, `w` `nw * k`, and `out` is valid for
/// writes at `t * ldo + j` for `t < m`, `j < nw`, touched by nobody else during the call.
#[target_feature(enable = "avx2,fma,avx512f")]
pub unsafe fn thin_product(x: &[f32], m: usize, k: usize, w: &[f32], nw: usize, out: *mut f32, ldo: usize) {
    debug_assert!(k.is_multiple_of(16) && x.len() >= m * k && w.len() >= nw * k);
    macro_rules! tile {
        ($t:expr, $j:expr, $tm:expr, $jn:expr) => {
            match ($tm, $jn) {
                (4, 4) => {
                    thin_tile::<4, 4>(x.as_ptr().add($t * k), k, w.as_ptr().add($j * k), k, out.add($t * ldo + $j), ldo)
                }
                (4, 3) => {
                    thin_tile::<4, 3>(x.as_ptr().add($t * k), k, w.as_ptr().add($j * k), k, out.add($t * ldo + $j), ldo)
                }
                (4, 2) => {
                    thin_tile::<4, 2>(x.as_ptr().add($t * k), k, w.as_ptr().add($j * k), k, out.add($t * ldo + $j), ldo)
                }
                (4, 1) => {
                    thin_tile::<4, 1>(x.as_ptr().add($t * k), k, w.as_ptr().add($j * k), k, out.add($t * ldo + $j), ldo)
                }
                (3, jn) => {
                    thin_rows::<3>(x.as_ptr().add($t * k), k, w.as_ptr().add($j * k), jn, out.add($t * ldo + $j), ldo)
                }
                (2, jn) => {
                    thin_rows::<2>(x.as_ptr().add($t * k), k, w.as_ptr().add($j * k), jn, out.add($t * ldo + $j), ldo)
                }
                (_, jn) => {
                    thin_rows::<1>(x.as_ptr().add($t * k), k, w.as_ptr().add($j * k), jn, out.add($t * ldo + $j), ldo)
                }
            }
        };
    }
    let mut j = 0;
    while j < nw {
        let jn = (nw - j).min(THIN_JN);
        let mut t = 0;
        while t < m {
            let tm = (m - t).min(THIN_TM);
            tile!(t, j, tm, jn);
            t += tm;
        }
        j += jn;
    }
}

/// The edge tiles with fewer than [`THIN_TM`] rows of `x`: one weight row at a time.
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn thin_rows<const TM: usize>(x: *const f32, k: usize, w: *const f32, jn: usize, out: *mut f32, ldo: usize) {
    for j in 0..jn {
        thin_tile::<TM, 1>(x, k, w.add(j * k), k, out.add(j), ldo);
    }
}
