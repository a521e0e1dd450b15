//! CPU kernels on plain slices: weights in f32, bf16 or f16, activations and accumulation in f32.

use crate::error::{Error, Result};
use candle_core::{CpuStorage, Storage, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

/// A borrowed view of a 2-D weight matrix's elements, row-major.
#[derive(Clone, Copy)]
pub enum WeightSlice<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

/// Runs `f` on the raw elements of a contiguous CPU tensor (no copy).
pub fn with_weights<R>(t: &Tensor, f: impl FnOnce(WeightSlice<'_>) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) =
        layout.contiguous_offsets().ok_or_else(|| Error::Internal("weight tensor is not contiguous".into()))?;
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Internal("decode kernels need CPU weights".into()));
    };
    Ok(match cpu {
        CpuStorage::F32(v) => f(WeightSlice::F32(&v[start..end])),
        CpuStorage::BF16(v) => f(WeightSlice::BF16(&v[start..end])),
        CpuStorage::F16(v) => f(WeightSlice::F16(&v[start..end])),
        _ => return Err(Error::Internal("unsupported weight dtype for the CPU kernels".into())),
    })
}

#[cfg(target_arch = "x86_64")]
mod x86;

/// Whether the AVX2 + FMA + F16C paths run (checked once; `TDA_ENGINE_PORTABLE=1` turns them off).
#[inline]
pub fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static SIMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SIMD.get_or_init(|| {
            std::env::var_os("TDA_ENGINE_PORTABLE").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `a . b`, with the SIMD path when the CPU has it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: simd() checked the CPU features.
        return unsafe { x86::dot_f32(a, b) };
    }
    dot_portable(a, b)
}

/// `y += a * x`, with the SIMD path when the CPU has it.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: simd() checked the CPU features.
        return unsafe { x86::axpy_f32(a, x, y) };
    }
    axpy_portable(a, x, y)
}

/// Dot product with 8 independent accumulators, so the compiler can vectorise it.
#[inline]
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a * x`, portable.
#[inline]
pub fn axpy_portable(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Dot product of a bf16 or f16 row with f32 `x`, converting 64 elements at a time on the stack.
#[inline]
fn dot_half<T: Copy>(row: &[T], x: &[f32], convert: impl Fn(&[T], &mut [f32])) -> f32 {
    let mut buf = [0f32; 64];
    let mut s = 0f32;
    for (r, xs) in row.chunks(64).zip(x.chunks(64)) {
        let b = &mut buf[..r.len()];
        convert(r, b);
        s += dot_portable(b, xs);
    }
    s
}

/// Converts one row (`cols` elements starting at row `r`) of a weight matrix to f32.
pub fn row_to_f32(w: WeightSlice<'_>, r: usize, cols: usize, out: &mut [f32]) {
    let span = r * cols..(r + 1) * cols;
    match w {
        WeightSlice::F32(v) => out.copy_from_slice(&v[span]),
        WeightSlice::BF16(v) => v[span].convert_to_f32_slice(out),
        WeightSlice::F16(v) => v[span].convert_to_f32_slice(out),
    }
}

/// Work per rayon task, in multiply-adds; below it a matrix-vector product runs on one thread.
const MIN_PARALLEL_WORK: usize = 1 << 15;

/// `out[r] = W[r, :] . x` for a row-major `rows x cols` matrix, split over threads by rows.
pub fn gemv(w: WeightSlice<'_>, cols: usize, x: &[f32], out: &mut [f32]) {
    let rows = out.len();
    debug_assert_eq!(x.len(), cols);
    let row_dot = |r: usize| row_dot(w, r, cols, x);
    if rows * cols < 2 * MIN_PARALLEL_WORK {
        for (r, o) in out.iter_mut().enumerate() {
            *o = row_dot(r);
        }
        return;
    }
    let rows_per_task = (MIN_PARALLEL_WORK / cols.max(1)).clamp(4, rows.div_ceil(rayon::current_num_threads()));
    out.par_chunks_mut(rows_per_task).enumerate().for_each(|(c, chunk)| {
        let r0 = c * rows_per_task;
        for (i, o) in chunk.iter_mut().enumerate() {
            *o = row_dot(r0 + i);
        }
    });
}

/// Per-element view of one weight row for the fused FFN: `dot` with f32 `x`, and `y += a * row`.
#[inline]
fn row_dot(w: WeightSlice<'_>, r: usize, cols: usize, x: &[f32]) -> f32 {
    let span = r * cols..(r + 1) * cols;
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: simd() checked the CPU features; the row and x have `cols` elements.
        return unsafe {
            match w {
                WeightSlice::F32(v) => x86::dot_f32(&v[span], x),
                WeightSlice::BF16(v) => x86::dot_bf16(&v[span], x),
                WeightSlice::F16(v) => x86::dot_f16(&v[span], x),
            }
        };
    }
    match w {
        WeightSlice::F32(v) => dot_portable(&v[span], x),
        WeightSlice::BF16(v) => dot_half(&v[span], x, |s, d| s.convert_to_f32_slice(d)),
        WeightSlice::F16(v) => dot_half(&v[span], x, |s, d| s.convert_to_f32_slice(d)),
    }
}

#[inline]
fn row_axpy(w: WeightSlice<'_>, r: usize, cols: usize, a: f32, y: &mut [f32]) {
    let span = r * cols..(r + 1) * cols;
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: simd() checked the CPU features; the row and y have `cols` elements.
        return unsafe {
            match w {
                WeightSlice::F32(v) => x86::axpy_f32(a, &v[span], y),
                WeightSlice::BF16(v) => x86::axpy_bf16(a, &v[span], y),
                WeightSlice::F16(v) => x86::axpy_f16(a, &v[span], y),
            }
        };
    }
    match w {
        WeightSlice::F32(v) => axpy_portable(a, &v[span], y),
        WeightSlice::BF16(v) => axpy_half(a, &v[span], y, |s, d| s.convert_to_f32_slice(d)),
        WeightSlice::F16(v) => axpy_half(a, &v[span], y, |s, d| s.convert_to_f32_slice(d)),
    }
}

#[inline]
fn axpy_half<T: Copy>(a: f32, row: &[T], y: &mut [f32], convert: impl Fn(&[T], &mut [f32])) {
    let mut buf = [0f32; 64];
    for (r, ys) in row.chunks(64).zip(y.chunks_mut(64)) {
        let b = &mut buf[..r.len()];
        convert(r, b);
        axpy_portable(a, b, ys);
    }
}

/// Asks the CPU to start loading row `r` (the first few cache lines; the hardware prefetcher
/// follows on from there).
#[inline(always)]
fn prefetch_row(w: WeightSlice<'_>, r: usize, cols: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let (ptr, bytes) = match w {
            WeightSlice::F32(v) => (v[r * cols..].as_ptr() as *const i8, cols * 4),
            WeightSlice::BF16(v) => (v[r * cols..].as_ptr() as *const i8, cols * 2),
            WeightSlice::F16(v) => (v[r * cols..].as_ptr() as *const i8, cols * 2),
        };
        for off in (0..bytes.min(PREFETCH_BYTES)).step_by(64) {
            // SAFETY: prefetching is a hint; the address is inside the row (checked by the slicing above).
            unsafe { _mm_prefetch(ptr.add(off), _MM_HINT_T0) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, r, cols);
}

/// How much of the next kept neuron's rows [`ffn_decode`] prefetches.
const PREFETCH_BYTES: usize = 4096;

/// The weights of one gated FFN for [`ffn_decode`]: `gate` and `up` are `n x d`, `down_t` is the
/// down projection transposed, `n x d`, so that every neuron owns one contiguous row of each.
#[derive(Clone, Copy)]
pub struct FfnWeights<'a> {
    pub gate: WeightSlice<'a>,
    pub up: WeightSlice<'a>,
    pub down_t: WeightSlice<'a>,
    pub gate_bias: Option<&'a [f32]>,
    pub up_bias: Option<&'a [f32]>,
    pub d: usize,
}

/// Most partial sums [`ffn_decode`] uses; the caller's `partials` holds `MAX_FFN_CHUNKS * d` floats.
pub const MAX_FFN_CHUNKS: usize = 32;

/// One token through a gated FFN, computing only the neurons in `kept` (all `n` when `None`):
/// `out = sum_j act(g_j . x + bg_j) * (u_j . x + bu_j) * down_t_j`.
///
/// Each neuron reads its three weight rows once and nothing else is read, so the bytes read are
/// proportional to the neurons kept. The neuron list is cut into fixed chunks whose partial sums
/// are added in chunk order, so the result does not depend on thread scheduling.
pub fn ffn_decode(
    w: FfnWeights<'_>,
    n: usize,
    kept: Option<&[u32]>,
    x: &[f32],
    act: impl Fn(f32) -> f32 + Sync,
    partials: &mut [f32],
    out: &mut [f32],
) {
    let d = w.d;
    let count = kept.map_or(n, <[u32]>::len);
    out[..d].fill(0.0);
    if count == 0 {
        return;
    }
    let neuron = |i: usize| kept.map_or(i, |k| k[i] as usize);
    let work = |range: std::ops::Range<usize>, acc: &mut [f32]| {
        acc.fill(0.0);
        let end = range.end;
        for i in range {
            let j = neuron(i);
            if kept.is_some() && i + 1 < end {
                // Skipped neurons break the sequential stream the hardware prefetcher follows:
                // start the next kept neuron's rows early.
                let nj = neuron(i + 1);
                for wt in [w.gate, w.up, w.down_t] {
                    prefetch_row(wt, nj, d);
                }
            }
            let g = row_dot(w.gate, j, d, x) + w.gate_bias.map_or(0.0, |b| b[j]);
            let u = row_dot(w.up, j, d, x) + w.up_bias.map_or(0.0, |b| b[j]);
            row_axpy(w.down_t, j, d, act(g) * u, acc);
        }
    };
    // Each neuron costs 3 rows of d multiply-adds.
    let per_chunk = (MIN_PARALLEL_WORK / (3 * d).max(1)).max(1);
    let chunks = count.div_ceil(per_chunk).clamp(1, MAX_FFN_CHUNKS.min(partials.len() / d.max(1)).max(1));
    let size = count.div_ceil(chunks);
    if chunks == 1 {
        work(0..count, &mut out[..d]);
        return;
    }
    partials[..chunks * d].par_chunks_mut(d).enumerate().for_each(|(c, acc)| {
        work(c * size..((c + 1) * size).min(count), acc);
    });
    for acc in partials[..chunks * d].chunks(d) {
        for (o, p) in out[..d].iter_mut().zip(acc) {
            *o += p;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], cols: usize, x: &[f32]) -> Vec<f32> {
        w.chunks(cols).map(|r| r.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32).collect()
    }

    #[test]
    fn gemv_matches_reference_all_dtypes_and_odd_sizes() {
        for &(rows, cols) in &[(1, 1), (3, 7), (17, 65), (300, 129), (1024, 300)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let x: Vec<f32> = (0..cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let cases: [(WeightSlice, Vec<f32>); 3] = [
                (WeightSlice::F32(&w), w.clone()),
                (WeightSlice::BF16(&wb), wb.iter().map(|v| v.to_f32()).collect()),
                (WeightSlice::F16(&wh), wh.iter().map(|v| v.to_f32()).collect()),
            ];
            for (ws, wf) in cases {
                let mut out = vec![0f32; rows];
                gemv(ws, cols, &x, &mut out);
                let want = reference(&wf, cols, &x);
                for (a, b) in out.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{rows}x{cols}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn ffn_decode_matches_reference_dense_and_sparse() {
        let act = |v: f32| v / (1.0 + (-v).exp());
        for &(n, d) in &[(1, 3), (7, 5), (300, 33), (1000, 130)] {
            let mk = |seed: usize, len: usize| -> Vec<f32> {
                (0..len).map(|i| (((i * 31 + seed * 17) % 97) as f32 - 48.0) / 40.0).collect()
            };
            let (g, u, dt, x) = (mk(1, n * d), mk(2, n * d), mk(3, n * d), mk(4, d));
            let kept: Vec<u32> = (0..n as u32).filter(|j| j % 3 != 1).collect();
            for sel in [None, Some(&kept[..])] {
                let mut want = vec![0f64; d];
                let idx: Vec<usize> = sel.map_or((0..n).collect(), |k| k.iter().map(|&j| j as usize).collect());
                for &j in &idx {
                    let dg: f32 = g[j * d..(j + 1) * d].iter().zip(&x).map(|(a, b)| a * b).sum();
                    let du: f32 = u[j * d..(j + 1) * d].iter().zip(&x).map(|(a, b)| a * b).sum();
                    let a = act(dg) * du;
                    for i in 0..d {
                        want[i] += (a * dt[j * d + i]) as f64;
                    }
                }
                let gb: Vec<bf16> = g.iter().map(|&v| bf16::from_f32(v)).collect();
                let ub: Vec<bf16> = u.iter().map(|&v| bf16::from_f32(v)).collect();
                let db: Vec<bf16> = dt.iter().map(|&v| bf16::from_f32(v)).collect();
                let cases = [
                    (WeightSlice::F32(&g), WeightSlice::F32(&u), WeightSlice::F32(&dt), 1e-3),
                    (WeightSlice::BF16(&gb), WeightSlice::BF16(&ub), WeightSlice::BF16(&db), 0.1),
                ];
                for (wg, wu, wd, tol) in cases {
                    let w = FfnWeights { gate: wg, up: wu, down_t: wd, gate_bias: None, up_bias: None, d };
                    let mut partials = vec![0f32; MAX_FFN_CHUNKS * d];
                    let mut out = vec![0f32; d];
                    ffn_decode(w, n, sel, &x, act, &mut partials, &mut out);
                    let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
                    for (o, w) in out.iter().zip(&want) {
                        assert!(((*o as f64) - w).abs() <= tol * scale, "n={n} d={d}: {o} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn dot_and_axpy_match_reference_on_every_path_and_size() {
        for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100, 577] {
            let w: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0).collect();
            let x: Vec<f32> = (0..n).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let widen = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
            let cases = [
                (widen(&w), "f32"),
                (wb.iter().map(|v| v.to_f32() as f64).collect(), "bf16"),
                (wh.iter().map(|v| v.to_f32() as f64).collect(), "f16"),
            ];
            for (wf, name) in cases {
                let want_dot: f64 = wf.iter().zip(&x).map(|(a, b)| a * *b as f64).sum();
                let want_axpy: Vec<f64> = wf.iter().zip(&x).map(|(a, b)| *b as f64 + 0.5 * a).collect();
                let tol = 1e-4 * (1.0 + wf.iter().zip(&x).map(|(a, b)| (a * *b as f64).abs()).sum::<f64>());
                let mut paths: Vec<(&str, f32, Vec<f32>)> = vec![];
                let mut y = x.clone();
                let d = match name {
                    "f32" => {
                        axpy_portable(0.5, &w, &mut y);
                        dot_portable(&w, &x)
                    }
                    "bf16" => {
                        axpy_half(0.5, &wb, &mut y, |s, d| s.convert_to_f32_slice(d));
                        dot_half(&wb, &x, |s, d| s.convert_to_f32_slice(d))
                    }
                    _ => {
                        axpy_half(0.5, &wh, &mut y, |s, d| s.convert_to_f32_slice(d));
                        dot_half(&wh, &x, |s, d| s.convert_to_f32_slice(d))
                    }
                };
                paths.push(("portable", d, y));
                #[cfg(target_arch = "x86_64")]
                if simd() {
                    let mut y = x.clone();
                    // SAFETY: simd() checked the CPU features.
                    let d = unsafe {
                        match name {
                            "f32" => {
                                x86::axpy_f32(0.5, &w, &mut y);
                                x86::dot_f32(&w, &x)
                            }
                            "bf16" => {
                                x86::axpy_bf16(0.5, &wb, &mut y);
                                x86::dot_bf16(&wb, &x)
                            }
                            _ => {
                                x86::axpy_f16(0.5, &wh, &mut y);
                                x86::dot_f16(&wh, &x)
                            }
                        }
                    };
                    paths.push(("avx2+fma", d, y));
                } else if n == 0 {
                    eprintln!("skipped: this CPU has no AVX2+FMA+F16C, only the portable path was tested");
                }
                for (path, d, y) in paths {
                    assert!((d as f64 - want_dot).abs() <= tol, "{path} {name} n={n}: dot {d} vs {want_dot}");
                    for (a, b) in y.iter().zip(&want_axpy) {
                        assert!((*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()), "{path} {name} n={n}: axpy");
                    }
                }
            }
        }
    }
}
