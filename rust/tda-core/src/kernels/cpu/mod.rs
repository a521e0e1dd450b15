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

/// Dot product with 8 independent accumulators, so the compiler can vectorise it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// `y += a * x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
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
        s += dot(b, xs);
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
    let row_dot = |r: usize| -> f32 {
        let span = r * cols..(r + 1) * cols;
        match w {
            WeightSlice::F32(v) => dot(&v[span], x),
            WeightSlice::BF16(v) => dot_half(&v[span], x, |s, d| s.convert_to_f32_slice(d)),
            WeightSlice::F16(v) => dot_half(&v[span], x, |s, d| s.convert_to_f32_slice(d)),
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], cols: usize, x: &[f32]) -> Vec<f32> {
        w.chunks(cols).map(|r| r.iter().zip(x).map(|(a, b)| (*a as f64 * *b as f64)).sum::<f64>() as f32).collect()
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
}
