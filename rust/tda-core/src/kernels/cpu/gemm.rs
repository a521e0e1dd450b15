//! Prefill's matrix product, `out = x W^T` or `out = x W`, multi-threaded, in one of two ways
//! ([`prefill_path`]):
//! - **`tiles-avx2`**: our own blocked product. The activations are packed once into panels of
//!   six rows; each task owns a block of output columns, widens its weights (f32, bf16 or f16)
//!   straight into a packed panel of 256 steps x 16 columns as it reads them (so every weight is
//!   read from memory once per call and no widened copy of a matrix exists), and runs a register
//!   tile of 6 x 16 ([`super::x86::gemm_tile`]) over it.
//! - **`gemm-crate`**: the `gemm` crate (candle's own CPU GEMM). f32 weights are used in place;
//!   bf16 and f16 weights are widened a few MiB of rows at a time into a reused scratch buffer.
//!
//! The tiles run wherever the f32 decode path is AVX2 (AMD, and CPUs without AVX-512): measured
//! against the crate on this project's shapes (BENCHMARKS.md, issue 12), they are faster there in
//! every dtype. Where the decode path is AVX-512 (Intel) the crate's 512-bit kernels stay, since
//! the tiles are 256-bit and no Intel machine has measured them.

use super::{row_to_f32, WeightSlice};
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Elements of one widened block of weight rows (4 MiB of f32).
const BLOCK_ELEMS: usize = 1 << 20;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PACKED_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PACKED_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of a thread's reusable buffer in `key`, or of a fresh one if the
/// buffer is in use (a task stolen by this thread while it waits inside a parallel loop may be
/// another product: a second `Engine` on another Python thread shares the pool).
fn with_buffer<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// The prefill product's paths, by name.
pub const PREFILL_PATHS: [&str; 2] = ["tiles-avx2", "gemm-crate"];

/// The prefill product's path: `tiles-avx2` or `gemm-crate` (see the module doc), from the f32
/// decode path in use, or as `TDA_ENGINE_KERNELS` names it (`prefill=gemm-crate`, next to the
/// dtype paths: `avx2,prefill=gemm-crate`). Chosen once per process.
pub fn prefill_path() -> &'static str {
    static PATH: OnceLock<&'static str> = OnceLock::new();
    PATH.get_or_init(|| {
        let spec = std::env::var("TDA_ENGINE_KERNELS").unwrap_or_default();
        let wanted = spec.split(',').filter_map(|p| p.split_once('=')).find(|(k, _)| k.trim() == "prefill");
        let tiles_ok = cfg!(target_arch = "x86_64") && super::available().iter().any(|k| k.name == "avx2");
        match wanted.map(|(_, v)| v.trim()) {
            Some("gemm-crate") => "gemm-crate",
            Some("tiles-avx2") if tiles_ok => "tiles-avx2",
            _ => prefill_path_for(super::kernels().paths[0]),
        }
    })
}

/// [`prefill_path`] for an f32 decode path.
fn prefill_path_for(f32_path: &str) -> &'static str {
    if cfg!(target_arch = "x86_64") && f32_path == "avx2" {
        "tiles-avx2"
    } else {
        "gemm-crate"
    }
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
    // SAFETY: dst as the caller guarantees.
    unsafe { gemm_raw(Parallelism::None, (m, n, k), dst, ldd, false, (lhs, ldl), (rhs, rs, cs)) }
}

/// The `gemm` crate's product, checking `lhs` and `rhs` against their strides.
///
/// # Safety
/// `dst` must be valid for writes at `i * ldd + j` for every `i < m`, `j < n`, and nothing else
/// may access those elements during the call.
unsafe fn gemm_raw(
    par: Parallelism,
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ldd: usize,
    accumulate: bool,
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
    // SAFETY: dst is checked above and borrowed mutably for the call.
    unsafe { gemm_raw(par, (m, n, k), dst.as_mut_ptr(), ldd, accumulate, (lhs, ldl), (rhs, rs, cs)) }
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
    matmul_on(prefill_path(), x, rows, w, w_rows, w_cols, transposed, out)
}

/// [`matmul`] on a given path (of [`prefill_path`]'s names).
#[allow(clippy::too_many_arguments)]
pub fn matmul_on(
    path: &str,
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
    #[cfg(target_arch = "x86_64")]
    if path == "tiles-avx2" && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        return tiles::matmul(x, rows, w, (k, n), transposed, out);
    }
    #[cfg(target_arch = "x86_64")]
    if path == "gemm-crate"
        && transposed
        && rows <= thin_max_rows()
        && k.is_multiple_of(16)
        && is_x86_feature_detected!("avx512f")
    {
        return thin_matmul(x, rows, w, (k, n), out);
    }
    let _ = path;
    if let WeightSlice::F32(v) = w {
        let (rs, cs) = if transposed { (1, k) } else { (n, 1) };
        return gemm_f32(all_threads(), (rows, n, k), out, n, false, (x, k), (v, rs, cs));
    }
    // Blocks of whole weight rows: output columns when transposed, a slice of the sum over k when not.
    let per_block = (BLOCK_ELEMS / w_cols.max(1)).clamp(1, w_rows.max(1));
    with_buffer(&SCRATCH, per_block * w_cols, |scratch| {
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

/// Products over at most this many rows of activations take the thin product on AVX-512 CPUs
/// (`TDA_ENGINE_THIN_ROWS` overrides it; 0 turns it off): measured on the main job's shapes
/// (BENCHMARKS.md, issue 13).
fn thin_max_rows() -> usize {
    static ROWS: OnceLock<usize> = OnceLock::new();
    *ROWS.get_or_init(|| std::env::var("TDA_ENGINE_THIN_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(128))
}

/// `out = x W^T` for few rows of `x` (a short prompt): each task widens 16 rows of `W` into an
/// L1-sized tile (quantized blocks dequantized, half floats widened; f32 rows used in place) and
/// passes every row of `x` over it ([`super::x86::thin_product`]). The weights are read once, no
/// widened copy of a matrix is written, and nothing is packed: for a short prompt the `gemm`
/// crate's packing and the whole-matrix widening cost more than the product.
#[cfg(target_arch = "x86_64")]
fn thin_matmul(x: &[f32], rows: usize, w: WeightSlice<'_>, (k, n): (usize, usize), out: &mut [f32]) {
    const TASK_ROWS: usize = 16;
    struct Out(*mut f32);
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}
    impl Out {
        fn at(&self, j: usize) -> *mut f32 {
            self.0.wrapping_add(j)
        }
    }
    let o = Out(out.as_mut_ptr());
    let task = |c: usize| {
        let (j0, j1) = (c * TASK_ROWS, ((c + 1) * TASK_ROWS).min(n));
        let run = |tile: &[f32]| {
            // SAFETY: the CPU has AVX-512F (checked by the caller); `x` holds `rows * k` values,
            // `tile` the rows j0..j1, and each task writes only its own columns j0..j1 of `out`.
            unsafe { super::x86::thin_product(x, rows, k, tile, j1 - j0, o.at(j0), n) }
        };
        match w {
            WeightSlice::F32(v) => run(&v[j0 * k..j1 * k]),
            _ => with_buffer(&SCRATCH, (j1 - j0) * k, |tile| {
                tile.chunks_exact_mut(k).enumerate().for_each(|(i, row)| row_to_f32(w, j0 + i, k, row));
                run(tile)
            }),
        }
    };
    let tasks = n.div_ceil(TASK_ROWS);
    if rows * n * k < super::MIN_PARALLEL_WORK {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// The blocked product of the `tiles-avx2` path.
#[cfg(target_arch = "x86_64")]
mod tiles {
    use super::super::x86::{gemm_tile, TILE_COLS as NR, TILE_ROWS as MR};
    use super::super::WeightSlice;
    use super::{with_buffer, PACKED_A, PACKED_B};
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;

    /// Steps of the sum per packed panel: a task's activation panel (6 x 256 floats, 6 KiB) stays
    /// in L1 and its weight block (up to 8 x 16 x 256 floats, 128 KiB) in L2.
    const KC: usize = 256;
    /// Activation panels per block: 16 x 6 rows x 256 steps (96 KiB) stay in L2 while each
    /// 16-column weight panel (16 KiB) stays in L1 across them.
    const MC_PANELS: usize = 16;
    /// Most 16-column panels per task.
    const MAX_PANELS: usize = 8;

    /// The output, written by tasks in disjoint column blocks.
    struct Out(*mut f32);
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}
    impl Out {
        /// # Safety
        /// `i` must be inside the output.
        unsafe fn at(&self, i: usize) -> *mut f32 {
            unsafe { self.0.add(i) }
        }
    }

    /// Elements `start..start + out.len()` of `w`, as f32.
    fn widen(w: WeightSlice<'_>, start: usize, out: &mut [f32]) {
        let r = start..start + out.len();
        match w {
            WeightSlice::F32(v) => out.copy_from_slice(&v[r]),
            WeightSlice::BF16(v) => v[r].convert_to_f32_slice(out),
            WeightSlice::F16(v) => v[r].convert_to_f32_slice(out),
            WeightSlice::Q(q) => q.dequantize_range(r.start, out),
        }
    }

    /// Packs steps `p0..p0 + kc` of the 16-column panels `qs` of `B` into `b` (one `[kc][16]`
    /// panel after the other, zero past `n`), widening as it reads. `B` is `W^T` (`W` is `n x k`)
    /// when `transposed`, else `W` (`k x n`). `seg` is scratch for `max(kc, 16 * qs.len())` floats:
    /// one row segment of `W` is widened at a time, as one contiguous read.
    #[allow(clippy::too_many_arguments)]
    fn pack_b(
        w: WeightSlice<'_>,
        (k, n): (usize, usize),
        transposed: bool,
        qs: std::ops::Range<usize>,
        p0: usize,
        kc: usize,
        b: &mut [f32],
        seg: &mut [f32],
    ) {
        let (j0, j1) = (qs.start * NR, (qs.end * NR).min(n));
        if transposed {
            for (qq, q) in qs.enumerate() {
                let panel = &mut b[qq * KC * NR..][..kc * NR];
                for jj in 0..NR {
                    if q * NR + jj < n {
                        widen(w, (q * NR + jj) * k + p0, &mut seg[..kc]);
                        for (p, &v) in seg[..kc].iter().enumerate() {
                            panel[p * NR + jj] = v;
                        }
                    } else {
                        (0..kc).for_each(|p| panel[p * NR + jj] = 0.0);
                    }
                }
            }
        } else {
            let width = j1 - j0;
            seg[width..qs.len() * NR].fill(0.0);
            for p in 0..kc {
                widen(w, (p0 + p) * n + j0, &mut seg[..width]);
                for (qq, chunk) in seg[..qs.len() * NR].chunks_exact(NR).enumerate() {
                    b[(qq * KC + p) * NR..][..NR].copy_from_slice(chunk);
                }
            }
        }
    }

    /// One tile into `c` (row stride `ldc`), of which only `rows x cols` lie inside the output:
    /// a whole tile straight, an edge tile through a buffer.
    ///
    /// # Safety
    /// As [`gemm_tile`], for the `rows x cols` part of the tile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_into(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        acc: bool,
        rows: usize,
        cols: usize,
    ) {
        unsafe {
            if rows == MR && cols == NR {
                return gemm_tile(kc, a, b, c, ldc, acc);
            }
            let mut tile = [0f32; MR * NR];
            gemm_tile(kc, a, b, tile.as_mut_ptr(), NR, false);
            for i in 0..rows {
                for j in 0..cols {
                    let o = c.add(i * ldc + j);
                    *o = if acc { *o + tile[i * NR + j] } else { tile[i * NR + j] };
                }
            }
        }
    }

    /// `out (m x n) = x (m x k) . B`, `B` as in [`pack_b`].
    pub(super) fn matmul(
        x: &[f32],
        m: usize,
        w: WeightSlice<'_>,
        (k, n): (usize, usize),
        transposed: bool,
        out: &mut [f32],
    ) {
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            out[..m * n].fill(0.0);
            return;
        }
        let (panels_m, blocks_k, panels_n) = (m.div_ceil(MR), k.div_ceil(KC), n.div_ceil(NR));
        // A multiple of the thread count of tasks of at most MAX_PANELS panels each, as even as
        // the panels allow.
        let threads = rayon::current_num_threads();
        let tasks = (threads * panels_n.div_ceil(threads * MAX_PANELS)).min(panels_n);
        let per_task = panels_n.div_ceil(tasks);
        let tasks = panels_n.div_ceil(per_task);
        with_buffer(&PACKED_A, blocks_k * panels_m * KC * MR, |a| {
            // a[((kb * panels_m + ip) * KC + p) * MR + i] = x[ip * MR + i][kb * KC + p], zero past m.
            a.par_chunks_mut(KC * MR).enumerate().for_each(|(c, panel)| {
                let (kb, ip) = (c / panels_m, c % panels_m);
                let kc = KC.min(k - kb * KC);
                for i in 0..MR {
                    let r = ip * MR + i;
                    if r < m {
                        for (p, &v) in x[r * k + kb * KC..][..kc].iter().enumerate() {
                            panel[p * MR + i] = v;
                        }
                    } else {
                        (0..kc).for_each(|p| panel[p * MR + i] = 0.0);
                    }
                }
            });
            let (a, dst) = (&*a, Out(out.as_mut_ptr()));
            (0..tasks).into_par_iter().for_each(|t| {
                let (q0, q1) = (t * per_task, ((t + 1) * per_task).min(panels_n));
                with_buffer(&PACKED_B, (q1 - q0) * KC * NR + KC.max(MAX_PANELS * NR), |buf| {
                    let (b, seg) = buf.split_at_mut((q1 - q0) * KC * NR);
                    for kb in 0..blocks_k {
                        let (p0, kc) = (kb * KC, KC.min(k - kb * KC));
                        pack_b(w, (k, n), transposed, q0..q1, p0, kc, b, seg);
                        for i0 in (0..panels_m).step_by(MC_PANELS) {
                            for q in q0..q1 {
                                let (bp, cols) = (b[(q - q0) * KC * NR..].as_ptr(), NR.min(n - q * NR));
                                for ip in i0..(i0 + MC_PANELS).min(panels_m) {
                                    let ap = a[(kb * panels_m + ip) * KC * MR..].as_ptr();
                                    // SAFETY: AVX2 and FMA checked by the caller; the panels hold kc
                                    // steps; the tile lies inside this task's block of the output.
                                    unsafe {
                                        tile_into(
                                            kc,
                                            ap,
                                            bp,
                                            dst.at(ip * MR * n + q * NR),
                                            n,
                                            kb > 0,
                                            MR.min(m - ip * MR),
                                            cols,
                                        )
                                    }
                                }
                            }
                        }
                    }
                })
            });
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn matmul_matches_reference_for_every_path_dtype_layout_and_block_split() {
        let mut paths = vec!["gemm-crate"];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            paths.push("tiles-avx2");
        }
        if paths.len() < 2 {
            eprintln!("skipped the tiles-avx2 path: this CPU lacks AVX2/FMA");
        }
        // (rows of x, W rows, W cols): odd sizes, a matrix of more than one widened block, and
        // products of several 6-row panels, 16-column panels and 256-step blocks with ragged edges.
        // Widths of whole 16s and 32s take the thin product on AVX-512 CPUs (up to its row count;
        // 129 rows go past it), and quantized weights as well.
        let sizes = [
            (1, 1, 1),
            (3, 7, 5),
            (5, 33, 17),
            (2, 1100, 1000),
            (13, 37, 600),
            (7, 300, 257),
            (19, 530, 70),
            (37, 70, 576),
            (6, 19, 32),
            (9, 17, 64),
            (10, 18, 32),
            (129, 21, 64),
        ];
        for (path, &(m, wr, wc)) in paths.iter().flat_map(|p| sizes.iter().map(move |s| (p, s))) {
            let w: Vec<f32> = (0..wr * wc).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let q =
                (wc % 32 == 0).then(|| crate::quant::QBlocks::quantize(crate::quant::QType::Q4_1, &w, wr, wc).unwrap());
            let mut slices = vec![WeightSlice::F32(&w), WeightSlice::BF16(&wb), WeightSlice::F16(&wh)];
            slices.extend(q.as_ref().map(|q| WeightSlice::Q(q.slice())));
            for ws in slices {
                let mut wf = vec![0f32; wr * wc];
                for r in 0..wr {
                    row_to_f32(ws, r, wc, &mut wf[r * wc..(r + 1) * wc]);
                }
                for transposed in [true, false] {
                    let (k, n) = if transposed { (wc, wr) } else { (wr, wc) };
                    let x: Vec<f32> = (0..m * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
                    let mut out = vec![f32::NAN; m * n];
                    matmul_on(path, &x, m, ws, wr, wc, transposed, &mut out);
                    for t in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|i| {
                                    let wv = if transposed { wf[j * wc + i] } else { wf[i * wc + j] };
                                    x[t * k + i] as f64 * wv as f64
                                })
                                .sum();
                            let got = out[t * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                                "{path} {m}x{wr}x{wc} t={transposed}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tiles_compute_each_row_on_its_own() {
        // What lets the decoder prune the last layer to the rows it reads (`Backend::row_exact`):
        // a row of the product is bitwise the same whatever the other rows are.
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            for &(wr, wc, m) in &[(576, 576, 40), (1536, 577, 13), (70, 33, 7)] {
                let w: Vec<f32> = (0..wr * wc).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
                let x: Vec<f32> =
                    (0..m * wr.max(wc)).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0 + 1e-3 * i as f32).collect();
                let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                for (ws, transposed) in
                    [(WeightSlice::F32(&w), true), (WeightSlice::BF16(&wb), true), (WeightSlice::F32(&w), false)]
                {
                    let (k, n) = if transposed { (wc, wr) } else { (wr, wc) };
                    let x = &x[..m * k];
                    let mut all = vec![0f32; m * n];
                    matmul_on("tiles-avx2", x, m, ws, wr, wc, transposed, &mut all);
                    for r in [0, m / 2, m - 1] {
                        let mut one = vec![0f32; n];
                        matmul_on("tiles-avx2", &x[r * k..], 1, ws, wr, wc, transposed, &mut one);
                        assert!(one == all[r * n..(r + 1) * n], "{wr}x{wc} row {r} of {m}");
                    }
                }
            }
            return;
        }
        eprintln!("skipped the tiles-avx2 path: this CPU lacks AVX2/FMA");
    }
}
