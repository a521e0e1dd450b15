//! x86-64 dot products of block-quantized weight rows with 8-bit activations (ggml's integer
//! scheme), for the 32-element formats: Q4_0, Q4_1, Q5_0 and Q8_0 rows against Q8_0 or Q8_1
//! activation blocks, and `y += a * row` for Q8_0 rows (the sparse FFN's transposed down
//! projection). Two variants of each dot: AVX2 (`maddubs` + `madd`: u8 x i8 pairs summed to i16,
//! then to i32) and AVX-512 VNNI on 256-bit vectors (`vpdpbusd`: u8 x i8 quadruples summed straight
//! into i32, one instruction instead of two); the multi-row matrix-vector loops also come on 512-bit
//! VNNI vectors, two blocks per instruction. Besides them: the same products with f32 activations
//! (the other scheme, measured against these), and the dequantization the prefill widens with.
//!
//! Block layouts (ggml's, `repr(C)`, little-endian): Q4_0 `d: f16, qs: [u8; 16]` (element j is the
//! low nibble of `qs[j]`, element j + 16 the high one, both minus 8); Q4_1 `d, m: f16, qs: [u8; 16]`
//! (`d q + m`); Q5_0 `d: f16, qh: u32, qs: [u8; 16]` (the fifth bit of element j is bit j of `qh`,
//! minus 16); Q8_0 `d: f16, qs: [i8; 32]`; activations Q8_0 as Q8_0's, Q8_1 `d, s: f16, qs: [i8; 32]`
//! with `s = d * sum(qs)`.
//!
//! Every loop prefetches [`PREFETCH_AHEAD`] bytes ahead, on from the end of its row into `next`
//! (the row read next), as the float loops do.

use super::PREFETCH_AHEAD;
use std::arch::x86_64::*;

/// Size of an activation block of Q8_0 / Q8_1.
pub const Q8_0_BYTES: usize = 34;
pub const Q8_1_BYTES: usize = 36;

#[inline(always)]
unsafe fn prefetch(row: &[u8], next: &[u8], off: usize) {
    let off = off + PREFETCH_AHEAD;
    if off < row.len() {
        _mm_prefetch(row.as_ptr().add(off) as *const i8, _MM_HINT_T0);
    } else if off - row.len() < next.len() {
        _mm_prefetch(next.as_ptr().add(off - row.len()) as *const i8, _MM_HINT_T0);
    }
}

/// The f16 at `p` as f32 (F16C).
#[inline(always)]
unsafe fn h2f(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((p as *const u16).read_unaligned() as i32)))
}

/// 32 nibbles of 16 bytes as 32 bytes: low nibbles first (elements 0..16), then high ones.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let t = _mm_loadu_si128(p as *const __m128i);
    let b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    _mm256_and_si256(b, _mm256_set1_epi8(0x0f))
}

/// 0xFF in byte j where bit j of the u32 at `p` is set.
#[inline(always)]
unsafe fn bits_to_bytes(p: *const u8) -> __m256i {
    let x = (p as *const u32).read_unaligned();
    let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

#[inline(always)]
unsafe fn hsum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Sums of u8 x i8 products in groups of four, as 8 i32 lanes.
macro_rules! mul_sum_us8 {
    (avx2, $u:expr, $s:expr) => {
        _mm256_madd_epi16(_mm256_maddubs_epi16($u, $s), _mm256_set1_epi16(1))
    };
    (vnni, $u:expr, $s:expr) => {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), $u, $s)
    };
}

/// One block's product of a weight block at `pw` and an activation block at `pa`, as
/// `(scale, integer sums, extra)`: the block's dot product is `scale * sum(sums) + extra`.
/// Signed weights use the sign trick (`|x|` times `y` with `x`'s sign) for the u8 x i8 product.
macro_rules! block {
    (q4_0, $kind:tt, $pw:expr, $pa:expr) => {{
        let x = _mm256_sub_epi8(nibbles($pw.add(2)), _mm256_set1_epi8(8));
        let y = _mm256_loadu_si256($pa.add(2) as *const __m256i);
        (h2f($pw) * h2f($pa), mul_sum_us8!($kind, _mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x)), 0f32)
    }};
    (q4_1, $kind:tt, $pw:expr, $pa:expr) => {{
        let y = _mm256_loadu_si256($pa.add(4) as *const __m256i);
        (h2f($pw) * h2f($pa), mul_sum_us8!($kind, nibbles($pw.add(4)), y), h2f($pw.add(2)) * h2f($pa.add(2)))
    }};
    (q5_0, $kind:tt, $pw:expr, $pa:expr) => {{
        // (q | h << 4) - 16 is q where the bit is set and q | 0xF0 (as i8) where it is not.
        let hi = _mm256_andnot_si256(bits_to_bytes($pw.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
        let x = _mm256_or_si256(nibbles($pw.add(6)), hi);
        let y = _mm256_loadu_si256($pa.add(2) as *const __m256i);
        (h2f($pw) * h2f($pa), mul_sum_us8!($kind, _mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x)), 0f32)
    }};
    (q8_0, $kind:tt, $pw:expr, $pa:expr) => {{
        let x = _mm256_loadu_si256($pw.add(2) as *const __m256i);
        let y = _mm256_loadu_si256($pa.add(2) as *const __m256i);
        (h2f($pw) * h2f($pa), mul_sum_us8!($kind, _mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x)), 0f32)
    }};
}

/// Rows of a matrix-vector product computed together, sharing each activation block's loads.
const ROWS: usize = 4;

/// The loops of one block type on one path: `$dot`, one row against the activations (prefetching
/// on into `next`), and `$gemv`, consecutive rows of `row_bytes` each, [`ROWS`] at a time.
macro_rules! loops {
    ($t:tt, $kind:tt, $features:literal, $wb:expr, $ab:expr, $dot:ident, $gemv:ident) => {
        /// One row (`w`, whole blocks) against activations `a` (at least as many blocks).
        /// # Safety
        /// The CPU must have the features.
        #[target_feature(enable = $features)]
        pub unsafe fn $dot(w: &[u8], a: &[u8], next: &[u8]) -> f32 {
            let nb = w.len() / $wb;
            let (mut acc, mut extra) = ([_mm256_setzero_ps(); 2], 0f32);
            for i in 0..nb {
                let (pw, pa) = (w.as_ptr().add($wb * i), a.as_ptr().add($ab * i));
                if i % 2 == 0 {
                    prefetch(w, next, $wb * i);
                }
                let (scale, sums, e) = block!($t, $kind, pw, pa);
                acc[i & 1] = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(sums), acc[i & 1]);
                extra += e;
            }
            hsum8(_mm256_add_ps(acc[0], acc[1])) + extra
        }

        /// `out[r] = row r . a` for the `out.len()` consecutive rows of `w`, `row_bytes` each.
        /// # Safety
        /// The CPU must have the features; `w` holds the rows, `a` a row's worth of blocks.
        #[target_feature(enable = $features)]
        pub unsafe fn $gemv(w: &[u8], row_bytes: usize, a: &[u8], out: &mut [f32]) {
            let (nb, rows) = (row_bytes / $wb, out.len());
            debug_assert!(w.len() >= rows * row_bytes && a.len() >= nb * $ab);
            let mut r = 0;
            while r + ROWS <= rows {
                let base = w.as_ptr().add(r * row_bytes);
                let (mut acc, mut extra) = ([_mm256_setzero_ps(); ROWS], [0f32; ROWS]);
                for i in 0..nb {
                    let pa = a.as_ptr().add($ab * i);
                    for k in 0..ROWS {
                        let pw = base.add(k * row_bytes + $wb * i);
                        if i % 2 == 0 {
                            _mm_prefetch(pw.add(PREFETCH_AHEAD) as *const i8, _MM_HINT_T0);
                        }
                        let (scale, sums, e) = block!($t, $kind, pw, pa);
                        acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(sums), acc[k]);
                        extra[k] += e;
                    }
                }
                for k in 0..ROWS {
                    out[r + k] = hsum8(acc[k]) + extra[k];
                }
                r += ROWS;
            }
            for (k, o) in out[r..].iter_mut().enumerate() {
                let row = &w[(r + k) * row_bytes..(r + k + 1) * row_bytes];
                *o = $dot(row, a, &[]);
            }
        }
    };
}

loops!(q4_0, avx2, "avx2,fma,f16c", 18, Q8_0_BYTES, dot_q4_0, gemv_q4_0);
loops!(q4_1, avx2, "avx2,fma,f16c", 20, Q8_1_BYTES, dot_q4_1, gemv_q4_1);
loops!(q5_0, avx2, "avx2,fma,f16c", 22, Q8_0_BYTES, dot_q5_0, gemv_q5_0);
loops!(q8_0, avx2, "avx2,fma,f16c", 34, Q8_0_BYTES, dot_q8_0, gemv_q8_0);
loops!(q4_0, vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", 18, Q8_0_BYTES, dot_q4_0_vnni, gemv_q4_0_vnni);
loops!(q4_1, vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", 20, Q8_1_BYTES, dot_q4_1_vnni, gemv_q4_1_vnni);
loops!(q5_0, vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", 22, Q8_0_BYTES, dot_q5_0_vnni, gemv_q5_0_vnni);
loops!(q8_0, vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", 34, Q8_0_BYTES, dot_q8_0_vnni, gemv_q8_0_vnni);

/// `y += a * row` for a Q8_0 row (whole blocks; `y` as long as the row).
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy_q8_0(a: f32, w: &[u8], y: &mut [f32], next: &[u8]) {
    let nb = w.len() / 34;
    debug_assert!(y.len() >= 32 * nb);
    let py = y.as_mut_ptr();
    for i in 0..nb {
        let pw = w.as_ptr().add(34 * i);
        if i % 2 == 0 {
            prefetch(w, next, 34 * i);
        }
        let s = _mm256_set1_ps(a * h2f(pw));
        for k in 0..4 {
            let q = _mm_loadl_epi64(pw.add(2 + 8 * k) as *const __m128i);
            let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            let o = py.add(32 * i + 8 * k);
            _mm256_storeu_ps(o, _mm256_fmadd_ps(s, v, _mm256_loadu_ps(o)));
        }
    }
}

/// Dequantizes whole blocks of one of the 32-element formats (`q4_0`, `q4_1`, `q5_0`, `q8_0`) into
/// `out` (32 values a block): the prefill's products widen their weights with it.
macro_rules! dequant {
    ($name:ident, $wb:expr, |$pw:ident| $values:expr) => {
        /// # Safety
        /// The CPU must have AVX2, FMA and F16C; `out` holds 32 values per block of `w`.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn $name(w: &[u8], out: &mut [f32]) {
            let nb = w.len() / $wb;
            debug_assert!(out.len() >= 32 * nb);
            let po = out.as_mut_ptr();
            for i in 0..nb {
                let $pw = w.as_ptr().add($wb * i);
                // 32 signed or unsigned bytes, their scale and offset.
                let (bytes, d, m): (__m256i, f32, f32) = $values;
                let (vd, vm) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
                let lo = _mm256_castsi256_si128(bytes);
                let hi = _mm256_extracti128_si256(bytes, 1);
                for (k, h) in [lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)].into_iter().enumerate() {
                    let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(h));
                    // d * q + m rounded twice, as the reference loop does: the same floats bit for bit.
                    _mm256_storeu_ps(po.add(32 * i + 8 * k), _mm256_add_ps(_mm256_mul_ps(vd, v), vm));
                }
            }
        }
    };
}

dequant!(dequant_q4_0, 18, |pw| (_mm256_sub_epi8(nibbles(pw.add(2)), _mm256_set1_epi8(8)), h2f(pw), 0.0));
dequant!(dequant_q4_1, 20, |pw| (nibbles(pw.add(4)), h2f(pw), h2f(pw.add(2))));
dequant!(dequant_q5_0, 22, |pw| {
    let hi = _mm256_andnot_si256(bits_to_bytes(pw.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
    (_mm256_or_si256(nibbles(pw.add(6)), hi), h2f(pw), 0.0)
});
dequant!(dequant_q8_0, 34, |pw| (_mm256_loadu_si256(pw.add(2) as *const __m256i), h2f(pw), 0.0));

/// Quantizes `x` (whole blocks of 32) to Q8_0 blocks (`with_sum` false: `d: f16, qs: [i8; 32]`) or
/// Q8_1 blocks (`d, s: f16, qs`, with `s = d * sum(qs)` rounded as ggml's reference does) in `out`:
/// `d = max|x| / 127`, `q = round(x / d)` (to nearest even on ties; the reference rounds them away
/// from zero).
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `out` holds a block per 32 values of `x`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8(x: &[f32], out: &mut [u8], with_sum: bool) {
    let (bb, qoff) = if with_sum { (Q8_1_BYTES, 4) } else { (Q8_0_BYTES, 2) };
    let nb = x.len() / 32;
    debug_assert!(out.len() >= nb * bb);
    let sign = _mm256_set1_ps(-0.0);
    let to_f16 = |v: f32| _mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(v), _MM_FROUND_TO_NEAREST_INT), 0) as u16;
    let from_f16 = |h: u16| _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)));
    for i in 0..nb {
        let p = x.as_ptr().add(32 * i);
        let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
        let m = v.iter().fold(_mm256_setzero_ps(), |m, v| _mm256_max_ps(m, _mm256_andnot_ps(sign, *v)));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
        // i32 -> i16 -> i8 packs interleave 128-bit lanes; the permutation restores the order.
        let q16 = [_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])];
        let q8 =
            _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16[0], q16[1]), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let po = out.as_mut_ptr().add(bb * i);
        _mm256_storeu_si256(po.add(qoff) as *mut __m256i, q8);
        let dh = to_f16(d);
        (po as *mut u16).write_unaligned(dh);
        if with_sum {
            let s = q.iter().fold(_mm256_setzero_si256(), |a, q| _mm256_add_epi32(a, *q));
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
            let s = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)));
            // As the reference: f16(sum) times f16(d), rounded to f16.
            (po.add(2) as *mut u16).write_unaligned(to_f16(from_f16(to_f16(s as f32)) * from_f16(dh)));
        }
    }
}

/// The other decode scheme for the 32-element formats: f32 activations against weights widened in
/// registers (`d * q + m`, summed as `d * (q . x) + m * sum(x)`), no activation rounding. It takes
/// two to three times the instructions per block of the integer loops (i8 -> f32 conversions and
/// FMAs per row and block where `vpdpbusd` takes one): the kernels bench measures both
/// (BENCHMARKS.md), and decode keeps the integer loops. The prefill's logits take this one (exact
/// activations for one row, with no dequantized copy of the matrix).
///
/// One block of one row, on 256-bit (`avx2`) or 512-bit (`avx512`) vectors: the 32 weight bytes
/// widened and multiplied with the block's activations `xv`, as one vector of partial sums.
macro_rules! widened_dot {
    (avx2, $bytes:expr, $xv:expr) => {{
        let (lo, hi) = (_mm256_castsi256_si128($bytes), _mm256_extracti128_si256($bytes, 1));
        let q = [lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)]
            .map(|h| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(h)));
        let s = _mm256_fmadd_ps(q[1], $xv[1], _mm256_mul_ps(q[0], $xv[0]));
        _mm256_fmadd_ps(q[3], $xv[3], _mm256_fmadd_ps(q[2], $xv[2], s))
    }};
    (avx512, $bytes:expr, $xv:expr) => {{
        let q = [_mm256_castsi256_si128($bytes), _mm256_extracti128_si256($bytes, 1)]
            .map(|h| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(h)));
        _mm512_fmadd_ps(q[1], $xv[1], _mm512_mul_ps(q[0], $xv[0]))
    }};
}

/// The vector operations of one width, for [`gemv_float`]: zero, a block's activations (32 f32 as
/// 4 or 2 vectors), their sum, broadcast, FMA and the sum across lanes.
macro_rules! vec_ops {
    (avx2) => {
        (
            _mm256_setzero_ps,
            |p: *const f32| [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o))),
            |v: &[__m256; 4]| _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])),
            _mm256_set1_ps,
            _mm256_fmadd_ps,
            hsum8,
        )
    };
    (avx512) => {
        (
            _mm512_setzero_ps,
            |p: *const f32| [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))],
            |v: &[__m512; 2]| _mm512_add_ps(v[0], v[1]),
            _mm512_set1_ps,
            _mm512_fmadd_ps,
            _mm512_reduce_add_ps,
        )
    };
}

macro_rules! gemv_float {
    ($name:ident, $width:tt, $features:literal, $wb:expr, |$pw:ident| $values:expr) => {
        /// `out[r] = row r . x` for the `out.len()` consecutive rows of `w`, `row_bytes` each, [`ROWS`]
        /// at a time; `x` holds a row's worth of f32 values.
        /// # Safety
        /// The CPU must have the features; `w` holds the rows.
        #[target_feature(enable = $features)]
        pub unsafe fn $name(w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
            let (zero, load, sum, set1, fma, reduce) = vec_ops!($width);
            let (nb, rows) = (row_bytes / $wb, out.len());
            debug_assert!(w.len() >= rows * row_bytes && x.len() >= 32 * nb);
            let mut r = 0;
            while r < rows {
                let group = (rows - r).min(ROWS);
                let base = w.as_ptr().add(r * row_bytes);
                let mut acc = [zero(); ROWS];
                for i in 0..nb {
                    let xv = load(x.as_ptr().add(32 * i));
                    let xsum = sum(&xv);
                    for k in 0..group {
                        let $pw = base.add(k * row_bytes + $wb * i);
                        if i % 2 == 0 {
                            _mm_prefetch($pw.add(PREFETCH_AHEAD) as *const i8, _MM_HINT_T0);
                        }
                        let (bytes, d, m): (__m256i, f32, f32) = $values;
                        acc[k] = fma(set1(d), widened_dot!($width, bytes, xv), acc[k]);
                        if m != 0.0 {
                            acc[k] = fma(set1(m), xsum, acc[k]);
                        }
                    }
                }
                for k in 0..group {
                    out[r + k] = reduce(acc[k]);
                }
                r += group;
            }
        }
    };
}

/// The float-activation loops of the 32-element formats on both widths.
macro_rules! gemv_float_types {
    ($width:tt, $features:literal, $q4_0:ident, $q4_1:ident, $q5_0:ident, $q8_0:ident) => {
        gemv_float!($q4_0, $width, $features, 18, |pw| (
            _mm256_sub_epi8(nibbles(pw.add(2)), _mm256_set1_epi8(8)),
            h2f(pw),
            0.0
        ));
        gemv_float!($q4_1, $width, $features, 20, |pw| (nibbles(pw.add(4)), h2f(pw), h2f(pw.add(2))));
        gemv_float!($q5_0, $width, $features, 22, |pw| {
            let hi = _mm256_andnot_si256(bits_to_bytes(pw.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
            (_mm256_or_si256(nibbles(pw.add(6)), hi), h2f(pw), 0.0)
        });
        gemv_float!($q8_0, $width, $features, 34, |pw| (_mm256_loadu_si256(pw.add(2) as *const __m256i), h2f(pw), 0.0));
    };
}

gemv_float_types!(avx2, "avx2,fma,f16c", gemv_f_q4_0, gemv_f_q4_1, gemv_f_q5_0, gemv_f_q8_0);
gemv_float_types!(avx512, "avx2,fma,f16c,avx512f", gemv_f_q4_0_512, gemv_f_q4_1_512, gemv_f_q5_0_512, gemv_f_q8_0_512);

/// The same f32 in the low eight lanes as `lo` and the high eight as `hi`.
#[inline(always)]
unsafe fn pair_ps(lo: f32, hi: f32) -> __m512 {
    _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(lo), _mm512_set1_ps(hi))
}

/// The 32 nibbles of each of two blocks' 16 bytes at `p0` and `p1`, as 64 bytes in element order
/// (block 0's low nibbles, its high ones, then block 1's).
#[inline(always)]
unsafe fn nibbles_pair(p0: *const u8, p1: *const u8) -> __m512i {
    let (q0, q1) = (_mm_loadu_si128(p0 as *const __m128i), _mm_loadu_si128(p1 as *const __m128i));
    let t = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(q0, q0)), _mm256_set_m128i(q1, q1), 1);
    // The second and fourth 128-bit quarters (16-bit lanes 8..16 and 24..32) take the high nibbles.
    let t = _mm512_mask_srli_epi16(t, 0xFF00_FF00, t, 4);
    _mm512_and_si512(t, _mm512_set1_epi8(0x0f))
}

/// Two blocks' unsigned weight bytes, for the 512-bit loops: `(u, bias)` with `u - bias` the
/// weights (`vpdpbusd` takes u8 x i8, so signed weights are offset instead of the sign trick; the
/// offset's product with the activations is one `vpdpbusd` per block pair, shared by the rows).
macro_rules! pair {
    (q4_0, $p0:expr, $p1:expr) => {
        nibbles_pair($p0.add(2), $p1.add(2))
    };
    (q4_1, $p0:expr, $p1:expr) => {
        nibbles_pair($p0.add(4), $p1.add(4))
    };
    (q5_0, $p0:expr, $p1:expr) => {{
        let h = _mm512_inserti64x4(_mm512_castsi256_si512(bits_to_bytes($p0.add(2))), bits_to_bytes($p1.add(2)), 1);
        _mm512_or_si512(nibbles_pair($p0.add(6), $p1.add(6)), _mm512_and_si512(h, _mm512_set1_epi8(0x10)))
    }};
    (q8_0, $p0:expr, $p1:expr) => {{
        let w = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256($p0.add(2) as *const __m256i)),
            _mm256_loadu_si256($p1.add(2) as *const __m256i),
            1,
        );
        _mm512_xor_si512(w, _mm512_set1_epi8(0x80u8 as i8))
    }};
}

/// The 512-bit VNNI matrix-vector loops: [`ROWS`] rows at a time, two blocks per `vpdpbusd`.
/// `$bias` is the offset of [`pair!`] (0: none), `$min` whether the type has a minimum term
/// (Q4_1 against Q8_1 activations: `m * s` per block). An odd last block and leftover rows take
/// the 256-bit VNNI loops.
macro_rules! loops512 {
    ($t:tt, $wb:expr, $ab:expr, $qoff:expr, $bias:expr, $min:expr, $dot:ident, $name:ident) => {
        /// `out[r] = row r . a` for the `out.len()` consecutive rows of `w`, `row_bytes` each.
        /// # Safety
        /// The CPU must have AVX-512 F, BW, VL and VNNI; `w` holds the rows, `a` a row's worth
        /// of activation blocks.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub unsafe fn $name(w: &[u8], row_bytes: usize, a: &[u8], out: &mut [f32]) {
            let (nb, rows) = (row_bytes / $wb, out.len());
            debug_assert!(w.len() >= rows * row_bytes && a.len() >= nb * $ab);
            let (pairs, zero) = (nb / 2, _mm512_setzero_si512());
            let mut r = 0;
            while r + ROWS <= rows {
                let base = w.as_ptr().add(r * row_bytes);
                let (mut acc, mut extra) = ([_mm512_setzero_ps(); ROWS], [0f32; ROWS]);
                for i in 0..pairs {
                    let (pa0, pa1) = (a.as_ptr().add($ab * 2 * i), a.as_ptr().add($ab * (2 * i + 1)));
                    let y = _mm512_inserti64x4(
                        _mm512_castsi256_si512(_mm256_loadu_si256(pa0.add($qoff) as *const __m256i)),
                        _mm256_loadu_si256(pa1.add($qoff) as *const __m256i),
                        1,
                    );
                    let offset = if $bias != 0 {
                        _mm512_dpbusd_epi32(zero, _mm512_set1_epi8($bias as u8 as i8), y)
                    } else {
                        zero
                    };
                    let (da0, da1) = (h2f(pa0), h2f(pa1));
                    for k in 0..ROWS {
                        let pw0 = base.add(k * row_bytes + $wb * 2 * i);
                        let pw1 = pw0.add($wb);
                        _mm_prefetch(pw0.add(PREFETCH_AHEAD) as *const i8, _MM_HINT_T0);
                        let dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, pair!($t, pw0, pw1), y), offset);
                        let s = pair_ps(h2f(pw0) * da0, h2f(pw1) * da1);
                        acc[k] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(dot), acc[k]);
                        if $min {
                            extra[k] += h2f(pw0.add(2)) * h2f(pa0.add(2)) + h2f(pw1.add(2)) * h2f(pa1.add(2));
                        }
                    }
                }
                for k in 0..ROWS {
                    let row = &w[(r + k) * row_bytes..(r + k + 1) * row_bytes];
                    let last = if nb % 2 == 1 { $dot(&row[$wb * (nb - 1)..], &a[$ab * (nb - 1)..], &[]) } else { 0.0 };
                    out[r + k] = _mm512_reduce_add_ps(acc[k]) + extra[k] + last;
                }
                r += ROWS;
            }
            for (k, o) in out[r..].iter_mut().enumerate() {
                *o = $dot(&w[(r + k) * row_bytes..(r + k + 1) * row_bytes], a, &[]);
            }
        }
    };
}

loops512!(q4_0, 18, Q8_0_BYTES, 2, 8, false, dot_q4_0_vnni, gemv_q4_0_512);
loops512!(q4_1, 20, Q8_1_BYTES, 4, 0, true, dot_q4_1_vnni, gemv_q4_1_512);
loops512!(q5_0, 22, Q8_0_BYTES, 2, 16, false, dot_q5_0_vnni, gemv_q5_0_512);
loops512!(q8_0, 34, Q8_0_BYTES, 2, 128, false, dot_q8_0_vnni, gemv_q8_0_512);
