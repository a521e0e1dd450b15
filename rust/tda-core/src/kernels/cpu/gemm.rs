//! Prefill's matrix product, `out = x W^T` or `out = x W`, on the `gemm` crate (candle's own CPU
//! GEMM), multi-threaded. f32 weights are used in place. bf16 and f16 weights are widened block by
//! block (a few MiB of rows at a time, all threads) into a per-thread scratch buffer that is reused
//! from call to call, so no whole-matrix f32 copy is ever made or allocated.

use super::{row_to_f32, WeightSlice};
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;

/// Elements of one widened block of weight rows (4 MiB of f32).
const BLOCK_ELEMS: usize = 1 << 20;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// All of rayon's threads, for one product at a time.
fn all_threads() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        t => Parallelism::Rayon(t),
    }
}

/// A product on the calling thread alone (for products inside a parallel loop), into `dst`
/// given as a pointer: tasks may write interleaved parts of one matrix.
///
/// # Safety
/// `dst` must be valid for writes at `i * ldd + j` for every `i < m`, `j < n`, and nothing else
/// may access those elements during the call.
pub(super) unsafe fn gemm_f32_serial(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ldd: usize,
    (lhs, ldl): (&[f32], usize),
    (rhs, rs, cs): (&[f32], usize, usize),
) {
    assert!(m == 0 || k == 0 || lhs.len() >= (m - 1) * ldl + k);
    assert!(k == 0 || n == 0 || rhs.len() > (k - 1) * rs + (n - 1) * cs);
    // SAFETY: lhs and rhs as asserted; dst as the caller guarantees.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ldd as isize,
            false,
            lhs.as_ptr(),
            1,
            ldl as isize,
            rhs.as_ptr(),
            cs as isize,
            rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// `dst (m x n, row stride ldd) (+)= lhs (m x k, row stride ldl) . rhs`, where `rhs` is `k x n` with
/// strides (`rs` between its rows, `cs` between its columns), on `par` threads.
fn gemm_f32(
    par: Parallelism,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    ldd: usize,
    accumulate: bool,
    (lhs, ldl): (&[f32], usize),
    (rhs, rs, cs): (&[f32], usize, usize),
) {
    assert!(m == 0 || n == 0 || dst.len() >= (m - 1) * ldd + n);
    assert!(m == 0 || k == 0 || lhs.len() >= (m - 1) * ldl + k);
    assert!(k == 0 || n == 0 || rhs.len() > (k - 1) * rs + (n - 1) * cs);
    // SAFETY: the asserts above keep every index the strides reach inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            ldl as isize,
            rhs.as_ptr(),
            cs as isize,
            rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `out = x W^T` (`transposed`: `W` is `w_rows x w_cols` = `out_dim x in_dim`) or `out = x W`
/// (`W` is `in_dim x out_dim`); `x` holds `rows` rows.
pub fn matmul(
    x: &[f32],
    rows: usize,
    w: WeightSlice<'_>,
    w_rows: usize,
    w_cols: usize,
    transposed: bool,
    out: &mut [f32],
) {
    let (k, n) = if transposed { (w_cols, w_rows) } else { (w_rows, w_cols) };
    let (x, out) = (&x[..rows * k], &mut out[..rows * n]);
    if let WeightSlice::F32(v) = w {
        let (rs, cs) = if transposed { (1, k) } else { (n, 1) };
        return gemm_f32(all_threads(), (rows, n, k), out, n, false, (x, k), (v, rs, cs));
    }
    // Blocks of whole weight rows: output columns when transposed, a slice of the sum over k when not.
    let per_block = (BLOCK_ELEMS / w_cols.max(1)).clamp(1, w_rows.max(1));
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.resize(per_block * w_cols, 0.0);
        for r0 in (0..w_rows).step_by(per_block) {
            let r1 = (r0 + per_block).min(w_rows);
            let block = &mut scratch[..(r1 - r0) * w_cols];
            block.par_chunks_mut(w_cols).enumerate().for_each(|(i, row)| row_to_f32(w, r0 + i, w_cols, row));
            if transposed {
                gemm_f32(all_threads(), (rows, r1 - r0, k), &mut out[r0..], n, false, (x, k), (block, 1, k));
            } else {
                gemm_f32(all_threads(), (rows, n, r1 - r0), out, n, r0 > 0, (&x[r0..], k), (block, n, 1));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn matmul_matches_reference_for_every_dtype_layout_and_block_split() {
        // (rows of x, W rows, W cols): odd sizes, and a matrix of more than one widened block.
        for &(m, wr, wc) in &[(1, 1, 1), (3, 7, 5), (5, 33, 17), (2, 1100, 1000)] {
            let w: Vec<f32> = (0..wr * wc).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            for ws in [WeightSlice::F32(&w), WeightSlice::BF16(&wb), WeightSlice::F16(&wh)] {
                let mut wf = vec![0f32; wr * wc];
                for r in 0..wr {
                    row_to_f32(ws, r, wc, &mut wf[r * wc..(r + 1) * wc]);
                }
                for transposed in [true, false] {
                    let (k, n) = if transposed { (wc, wr) } else { (wr, wc) };
                    let x: Vec<f32> = (0..m * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
                    let mut out = vec![f32::NAN; m * n];
                    matmul(&x, m, ws, wr, wc, transposed, &mut out);
                    for t in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|i| {
                                    let wv = if transposed { wf[j * wc + i] } else { wf[i * wc + j] };
                                    x[t * k + i] as f64 * wv as f64
                                })
                                .sum();
                            let got = out[t * n + j] as f64;
                            assert!((got - want).abs() <= 1e-3 * (1.0 + want.abs()), "{m}x{wr}x{wc} t={transposed}");
                        }
                    }
                }
            }
        }
    }
}
