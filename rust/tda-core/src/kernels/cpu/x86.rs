//! AVX2 + FMA (+ F16C) versions of the decode kernels' inner loops: dot products of a weight row
//! (f32, bf16 or f16) with f32 activations, and `y += a * row`. Half-precision rows are widened in
//! registers, never through a buffer. Callers check the CPU features first ([`super::simd`]).

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
unsafe fn load_bf16(p: *const bf16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f16(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

macro_rules! dot_impl {
    ($name:ident, $t:ty, $features:literal, $load:expr, $scalar:expr) => {
        /// # Safety
        /// The CPU must have the enabled features; `a.len() == b.len()`.
        #[target_feature(enable = $features)]
        pub unsafe fn $name(a: &[$t], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
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
                s += $scalar(a[i]) * b[i];
                i += 1;
            }
            s
        }
    };
}

macro_rules! axpy_impl {
    ($name:ident, $t:ty, $features:literal, $load:expr, $scalar:expr) => {
        /// `y += a * x`.
        /// # Safety
        /// The CPU must have the enabled features; `x.len() == y.len()`.
        #[target_feature(enable = $features)]
        pub unsafe fn $name(a: f32, x: &[$t], y: &mut [f32]) {
            let n = x.len().min(y.len());
            let (px, py) = (x.as_ptr(), y.as_mut_ptr());
            let va = _mm256_set1_ps(a);
            let mut i = 0;
            while i + 8 <= n {
                _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(va, $load(px.add(i)), _mm256_loadu_ps(py.add(i))));
                i += 8;
            }
            while i < n {
                y[i] += a * $scalar(x[i]);
                i += 1;
            }
        }
    };
}

dot_impl!(dot_f32, f32, "avx2,fma", |p: *const f32| _mm256_loadu_ps(p), |v: f32| v);
dot_impl!(dot_bf16, bf16, "avx2,fma", |p| load_bf16(p), |v: bf16| v.to_f32());
dot_impl!(dot_f16, f16, "avx2,fma,f16c", |p| load_f16(p), |v: f16| v.to_f32());
axpy_impl!(axpy_f32, f32, "avx2,fma", |p: *const f32| _mm256_loadu_ps(p), |v: f32| v);
axpy_impl!(axpy_bf16, bf16, "avx2,fma", |p| load_bf16(p), |v: bf16| v.to_f32());
axpy_impl!(axpy_f16, f16, "avx2,fma,f16c", |p| load_f16(p), |v: f16| v.to_f32());
