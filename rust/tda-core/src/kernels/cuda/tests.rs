//! Parity of the CUDA backend with the CPU backend, operation by operation, on random inputs
//! (f32, bf16 and f16 weights; odd shapes that take the scalar paths; sparse, gated and dense
//! FFNs; recorded steps). Run on a machine with a GPU:
//!
//! ```text
//! cargo test --release -p tda-core --features cuda kernels::cuda
//! ```
//!
//! Without a device every test returns early (and says so), unless `TDA_CUDA_REQUIRED=1`.

use super::{device_count, CudaBackend};
use crate::config::Activation;
use crate::kernels::cpu::{activate, CpuBackend};
use crate::kernels::{AttnShape, Backend, Buf, Draw, FfnWeights, Graphs, Matrix};
use candle_core::{DType, Device, Tensor};
use std::sync::OnceLock;

fn backend() -> Option<&'static CudaBackend> {
    static BE: OnceLock<Option<CudaBackend>> = OnceLock::new();
    let be = BE.get_or_init(|| {
        let required = std::env::var("TDA_CUDA_REQUIRED").is_ok_and(|v| v == "1");
        match device_count() {
            Ok(n) if n > 0 => Some(CudaBackend::new(0).unwrap_or_else(|e| panic!("cuda:0: {e}"))),
            r => {
                assert!(!required, "TDA_CUDA_REQUIRED=1 but no CUDA device: {r:?}");
                eprintln!("no CUDA device: the CUDA parity tests are skipped");
                None
            }
        }
    });
    be.as_ref()
}

/// Deterministic values in [-1, 1).
fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(v: &[f32], rows: usize, cols: usize, dtype: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), (rows, cols), &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap()
}

fn down(be: &dyn Backend, b: &Buf, len: usize) -> Vec<f32> {
    let mut v = vec![0f32; len];
    be.download(b, &mut v).unwrap();
    v
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "{what}[{i}]: cuda {g} vs cpu {w} (scale {scale})");
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

#[test]
fn linear_matmul_and_linear3_match_the_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend;
    for dtype in DTYPES {
        for &(o, i) in &[(64, 64), (37, 99), (256, 520), (3, 7)] {
            let w = vals(o * i, 1);
            let (wc, wg) = (cpu.matrix(tensor(&w, o, i, dtype)).unwrap(), gpu.matrix(tensor(&w, o, i, dtype)).unwrap());
            let bias = vals(o, 2);
            let (bc, bg) = (cpu.upload(&bias).unwrap(), gpu.upload(&bias).unwrap());
            for rows in [1usize, 5] {
                let x = vals(rows * i, 3);
                let (xc, xg) = (cpu.upload(&x).unwrap(), gpu.upload(&x).unwrap());
                let (mut yc, mut yg) = (cpu.zeros(rows * o).unwrap(), gpu.zeros(rows * o).unwrap());
                cpu.linear(&wc, Some(&bc), &xc, rows, &mut yc).unwrap();
                gpu.linear(&wg, Some(&bg), &xg, rows, &mut yg).unwrap();
                // Many rows narrow x to the weight type for the tensor cores.
                let tol = if rows > 1 && dtype != DType::F32 { 2e-2 } else { 1e-4 };
                close(
                    &format!("linear {dtype:?} {o}x{i} rows {rows}"),
                    &down(gpu, &yg, rows * o),
                    &down(&cpu, &yc, rows * o),
                    tol,
                );
                // matmul: W read as (o x i) is `in x out` with in = o.
                let x2 = vals(rows * o, 4);
                let (x2c, x2g) = (cpu.upload(&x2).unwrap(), gpu.upload(&x2).unwrap());
                let b2 = vals(i, 5);
                let (b2c, b2g) = (cpu.upload(&b2).unwrap(), gpu.upload(&b2).unwrap());
                let (mut zc, mut zg) = (cpu.zeros(rows * i).unwrap(), gpu.zeros(rows * i).unwrap());
                cpu.matmul(&x2c, rows, &wc, Some(&b2c), &mut zc).unwrap();
                gpu.matmul(&x2g, rows, &wg, Some(&b2g), &mut zg).unwrap();
                close(
                    &format!("matmul {dtype:?} {o}x{i} rows {rows}"),
                    &down(gpu, &zg, rows * i),
                    &down(&cpu, &zc, rows * i),
                    tol,
                );
            }
        }
        // q, k, v in one launch.
        let (d, sizes) = (64, [64usize, 16, 16]);
        let x = vals(d, 6);
        let (xc, xg) = (cpu.upload(&x).unwrap(), gpu.upload(&x).unwrap());
        let ws: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(k, &o)| vals(o * d, 10 + k as u64)).collect();
        let wc: Vec<_> = ws.iter().zip(sizes).map(|(w, o)| cpu.matrix(tensor(w, o, d, dtype)).unwrap()).collect();
        let wg: Vec<_> = ws.iter().zip(sizes).map(|(w, o)| gpu.matrix(tensor(w, o, d, dtype)).unwrap()).collect();
        let bias = vals(16, 7);
        let (bc, bg) = (cpu.upload(&bias).unwrap(), gpu.upload(&bias).unwrap());
        let mut oc: Vec<Buf> = sizes.iter().map(|&o| cpu.zeros(o).unwrap()).collect();
        let mut og: Vec<Buf> = sizes.iter().map(|&o| gpu.zeros(o).unwrap()).collect();
        {
            let [a, b, c] = &mut oc[..] else { unreachable!() };
            cpu.linear3([(&wc[0], None), (&wc[1], Some(&bc)), (&wc[2], None)], &xc, [a, b, c]).unwrap();
            let [a, b, c] = &mut og[..] else { unreachable!() };
            gpu.linear3([(&wg[0], None), (&wg[1], Some(&bg)), (&wg[2], None)], &xg, [a, b, c]).unwrap();
        }
        for k in 0..3 {
            close(
                &format!("linear3 {dtype:?} part {k}"),
                &down(gpu, &og[k], sizes[k]),
                &down(&cpu, &oc[k], sizes[k]),
                1e-4,
            );
        }
    }
}

#[test]
fn ffn_decode_dense_and_sparse_match_the_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend;
    for dtype in DTYPES {
        for &(n, d) in &[(176usize, 64usize), (300, 130), (64, 7), (1024, 256)] {
            let (g, u, dt) = (vals(n * d, 1), vals(n * d, 2), vals(n * d, 3));
            let mk = |be: &dyn Backend| {
                [
                    be.matrix(tensor(&g, n, d, dtype)).unwrap(),
                    be.matrix(tensor(&u, n, d, dtype)).unwrap(),
                    be.matrix(tensor(&dt, n, d, dtype)).unwrap(),
                ]
            };
            let (mc, mg) = (mk(&cpu), mk(gpu));
            let bias = vals(n, 4);
            let (bc, bg) = (cpu.upload(&bias).unwrap(), gpu.upload(&bias).unwrap());
            let x = vals(d, 5);
            let (xc, xg) = (cpu.upload(&x).unwrap(), gpu.upload(&x).unwrap());
            let kept: Vec<u32> = (0..n as u32).filter(|j| j % 3 != 1).collect();
            let keep_row: Vec<f32> = (0..n).map(|j| if j % 3 != 1 { 1.0 } else { 0.0 }).collect();
            for act in [Activation::Silu, Activation::GeluTanh] {
                let wc = crate::kernels::FfnWeights {
                    gate: &mc[0],
                    up: &mc[1],
                    down_t: &mc[2],
                    down: None,
                    gate_bias: Some(&bc),
                    up_bias: None,
                    act,
                };
                let wg = crate::kernels::FfnWeights {
                    gate: &mg[0],
                    up: &mg[1],
                    down_t: &mg[2],
                    down: None,
                    gate_bias: Some(&bg),
                    up_bias: None,
                    act,
                };
                let (mut sc, mut sg) = (cpu.new_ffn_scratch(), gpu.new_ffn_scratch());
                for (version, sel) in [(1u64, Some(&kept[..])), (2, None), (3, Some(&kept[..5.min(kept.len())]))] {
                    cpu.prepare_ffn(&wc, sel, &keep_row, 0.0, version, &mut sc).unwrap();
                    gpu.prepare_ffn(&wg, sel, &keep_row, 0.0, version, &mut sg).unwrap();
                    for sparse in [false, true] {
                        let (mut oc, mut og) = (cpu.zeros(d).unwrap(), gpu.zeros(d).unwrap());
                        cpu.ffn_decode(&wc, sparse, &mut sc, &xc, &mut oc).unwrap();
                        gpu.ffn_decode(&wg, sparse, &mut sg, &xg, &mut og).unwrap();
                        let what = format!("ffn {dtype:?} n={n} d={d} {act:?} v{version} sparse={sparse}");
                        close(&what, &down(gpu, &og, d), &down(&cpu, &oc, d), 1e-4);
                    }
                }
            }
        }
    }
}

/// A gate threshold in the widest gap between consecutive values of the middle half of `|v|`, so
/// that no value lies within rounding of it: both backends then pass the same neurons.
fn threshold_in_gap(v: &[f32]) -> f32 {
    let mut a: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    a.sort_by(f32::total_cmp);
    let mid = &a[a.len() / 4..a.len() * 3 / 4 + 1];
    let (lo, hi) = mid.windows(2).map(|w| (w[0], w[1])).max_by(|x, y| (x.1 - x.0).total_cmp(&(y.1 - y.0))).unwrap();
    (lo + hi) / 2.0
}

/// Gate, up and transposed down matrices with a gate bias, as one FFN.
fn ffn_weights<'a>(m: &'a [Matrix; 3], gate_bias: &'a Buf, act: Activation) -> FfnWeights<'a> {
    FfnWeights { gate: &m[0], up: &m[1], down_t: &m[2], down: None, gate_bias: Some(gate_bias), up_bias: None, act }
}

/// The weights as the kernels see them (widened from `dtype`).
fn as_read(v: &[f32], rows: usize, cols: usize, dtype: DType) -> Vec<f32> {
    tensor(v, rows, cols, dtype).to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn gated_ffn_decode_and_sparse_act_match_the_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend;
    let act = Activation::Silu;
    for dtype in DTYPES {
        for &(n, d) in &[(176usize, 64usize), (300, 130), (1024, 256)] {
            let (g, u, dt) = (vals(n * d, 11), vals(n * d, 12), vals(n * d, 13));
            let mk = |be: &dyn Backend| {
                [
                    be.matrix(tensor(&g, n, d, dtype)).unwrap(),
                    be.matrix(tensor(&u, n, d, dtype)).unwrap(),
                    be.matrix(tensor(&dt, n, d, dtype)).unwrap(),
                ]
            };
            let (mc, mg) = (mk(&cpu), mk(gpu));
            let bias = vals(n, 14);
            let (bc, bg) = (cpu.upload(&bias).unwrap(), gpu.upload(&bias).unwrap());
            let (wc, wg) = (ffn_weights(&mc, &bc, act), ffn_weights(&mg, &bg, act));
            // Two token rows; |act(g_j . x + bg_j)| of both, for thresholds clear of every value.
            let xs = [vals(d, 15), vals(d, 16)];
            let gr = as_read(&g, n, d, dtype);
            let mut acts = Vec::with_capacity(2 * n);
            for x in &xs {
                for j in 0..n {
                    let s: f64 = (0..d).map(|c| gr[j * d + c] as f64 * x[c] as f64).sum();
                    acts.push(activate(act, (s + bias[j] as f64) as f32));
                }
            }
            let top = acts.iter().fold(0f32, |m, v| m.max(v.abs()));
            let kept: Vec<u32> = (0..n as u32).filter(|j| j % 3 != 1).collect();
            let keep_row: Vec<f32> = (0..n).map(|j| if j % 3 != 1 { 1.0 } else { 0.0 }).collect();
            let (mut sc, mut sg) = (cpu.new_ffn_scratch(), gpu.new_ffn_scratch());
            let mut version = 0;
            // A threshold in the middle (some pass), one above every value (none pass).
            for t in [threshold_in_gap(&acts), 2.0 * top] {
                for sel in [Some(&kept[..]), None] {
                    version += 1;
                    cpu.prepare_ffn(&wc, sel, &keep_row, t, version, &mut sc).unwrap();
                    gpu.prepare_ffn(&wg, sel, &keep_row, t, version, &mut sg).unwrap();
                    let what = format!("gated ffn {dtype:?} n={n} d={d} t={t} all={}", sel.is_none());
                    for x in &xs {
                        let (xc, xg) = (cpu.upload(x).unwrap(), gpu.upload(x).unwrap());
                        let (mut oc, mut og) = (cpu.zeros(d).unwrap(), gpu.zeros(d).unwrap());
                        cpu.ffn_decode(&wc, true, &mut sc, &xc, &mut oc).unwrap();
                        gpu.ffn_decode(&wg, true, &mut sg, &xg, &mut og).unwrap();
                        close(&what, &down(gpu, &og, d), &down(&cpu, &oc, d), 1e-4);
                    }
                    let (cc, cg) = (cpu.ffn_counts(&sc, version).unwrap(), gpu.ffn_counts(&sg, version).unwrap());
                    assert_eq!(cg, cc, "{what}: (rows, passed) cuda vs cpu");
                    assert_eq!(cg.0, 2, "{what}: rows");
                    assert!(t < top || cg.1 == 0, "{what}: {} passed a threshold above every value", cg.1);
                    assert_eq!(gpu.ffn_counts(&sg, version + 1), None, "{what}: counts of another selection");
                }
            }
            // The many-row pass: the same rule per row, counted the same way.
            let rows = 7;
            let (a, uu) = (vals(rows * n, 17).iter().map(|v| 4.0 * v).collect::<Vec<_>>(), vals(rows * n, 18));
            let mid = threshold_in_gap(&a.iter().map(|&v| activate(act, v)).collect::<Vec<_>>());
            for (t, sel) in [(mid, Some(&kept[..])), (mid, None), (0.0, Some(&kept[..]))] {
                version += 1;
                cpu.prepare_ffn(&wc, sel, &keep_row, t, version, &mut sc).unwrap();
                gpu.prepare_ffn(&wg, sel, &keep_row, t, version, &mut sg).unwrap();
                let (mut ac, mut ag) = (cpu.upload(&a).unwrap(), gpu.upload(&a).unwrap());
                let (uc, ug) = (cpu.upload(&uu).unwrap(), gpu.upload(&uu).unwrap());
                cpu.sparse_act(act, &mut ac, &uc, rows, n, &mut sc).unwrap();
                gpu.sparse_act(act, &mut ag, &ug, rows, n, &mut sg).unwrap();
                let what = format!("sparse_act {dtype:?} n={n} t={t} all={}", sel.is_none());
                close(&what, &down(gpu, &ag, rows * n), &down(&cpu, &ac, rows * n), 1e-6);
                let (cc, cg) = (cpu.ffn_counts(&sc, version).unwrap(), gpu.ffn_counts(&sg, version).unwrap());
                assert_eq!(cg, cc, "{what}: (rows, passed) cuda vs cpu");
            }
        }
    }
}

#[test]
fn norms_rope_embed_and_elementwise_match_the_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend;
    let (rows, dim) = (3usize, 200usize);
    let x = vals(rows * dim, 1);
    let gain = vals(dim, 2);
    let (xc, xg) = (cpu.upload(&x).unwrap(), gpu.upload(&x).unwrap());
    let (gc, gg) = (cpu.upload(&gain).unwrap(), gpu.upload(&gain).unwrap());
    let (mut oc, mut og) = (cpu.zeros(rows * dim).unwrap(), gpu.zeros(rows * dim).unwrap());
    cpu.rms_norm(&xc, &gc, 1e-6, dim, rows, &mut oc).unwrap();
    gpu.rms_norm(&xg, &gg, 1e-6, dim, rows, &mut og).unwrap();
    close("rms_norm", &down(gpu, &og, rows * dim), &down(&cpu, &oc, rows * dim), 1e-5);
    cpu.rms_norm_inplace(&mut oc, &gc, 1e-6, dim, rows).unwrap();
    gpu.rms_norm_inplace(&mut og, &gg, 1e-6, dim, rows).unwrap();
    close("rms_norm in place", &down(gpu, &og, rows * dim), &down(&cpu, &oc, rows * dim), 1e-5);

    // rope at positions 3.. of a 10-position table, heads of 8.
    let (hd, width, positions) = (8usize, 40usize, 10usize);
    let (cos, sin) = (vals(positions * hd / 2, 3), vals(positions * hd / 2, 4));
    let (cc, cg) = (cpu.upload(&cos).unwrap(), gpu.upload(&cos).unwrap());
    let (sc, sg) = (cpu.upload(&sin).unwrap(), gpu.upload(&sin).unwrap());
    let (mut stc, mut stg) = (cpu.new_step(rows).unwrap(), gpu.new_step(rows).unwrap());
    cpu.set_step(&mut stc, &[1, 7, 4], 3).unwrap();
    gpu.set_step(&mut stg, &[1, 7, 4], 3).unwrap();
    let q = vals(rows * width, 5);
    let (mut qc, mut qg) = (cpu.upload(&q).unwrap(), gpu.upload(&q).unwrap());
    cpu.rope(&mut qc, &cc, &sc, hd, width, &stc, rows).unwrap();
    gpu.rope(&mut qg, &cg, &sg, hd, width, &stg, rows).unwrap();
    close("rope", &down(gpu, &qg, rows * width), &down(&cpu, &qc, rows * width), 1e-6);

    for dtype in DTYPES {
        let table = vals(9 * 24, 6);
        let (tc, tg) =
            (cpu.matrix(tensor(&table, 9, 24, dtype)).unwrap(), gpu.matrix(tensor(&table, 9, 24, dtype)).unwrap());
        let (mut ec, mut eg) = (cpu.zeros(rows * 24).unwrap(), gpu.zeros(rows * 24).unwrap());
        cpu.embed(&tc, &stc, rows, Some(1.5), &mut ec).unwrap();
        gpu.embed(&tg, &stg, rows, Some(1.5), &mut eg).unwrap();
        close(&format!("embed {dtype:?}"), &down(gpu, &eg, rows * 24), &down(&cpu, &ec, rows * 24), 0.0);
        let (nc, ng) = (cpu.row_sq_norms(&tc).unwrap(), gpu.row_sq_norms(&tg).unwrap());
        for (a, b) in nc.iter().zip(&ng) {
            assert!((a - b).abs() <= 1e-9 * a.max(1.0), "row_sq_norms {dtype:?}: {a} vs {b}");
        }
    }

    let n = 1000;
    let (a, u) = (vals(n, 7).iter().map(|v| v * 6.0).collect::<Vec<_>>(), vals(n, 8));
    for act in [Activation::Silu, Activation::GeluTanh] {
        let (mut ac, mut ag) = (cpu.upload(&a).unwrap(), gpu.upload(&a).unwrap());
        let (uc, ug) = (cpu.upload(&u).unwrap(), gpu.upload(&u).unwrap());
        cpu.gate_act(act, &mut ac, &uc, n).unwrap();
        gpu.gate_act(act, &mut ag, &ug, n).unwrap();
        close(&format!("gate_act {act:?}"), &down(gpu, &ag, n), &down(&cpu, &ac, n), 1e-6);
        cpu.soft_cap(&mut ac, 2.0, n).unwrap();
        gpu.soft_cap(&mut ag, 2.0, n).unwrap();
        close("soft_cap", &down(gpu, &ag, n), &down(&cpu, &ac, n), 1e-6);
        cpu.add(&mut ac, &uc, n).unwrap();
        gpu.add(&mut ag, &ug, n).unwrap();
        close("add", &down(gpu, &ag, n), &down(&cpu, &ac, n), 1e-6);
        let (mut cc2, mut cg2) = (cpu.zeros(13).unwrap(), gpu.zeros(13).unwrap());
        cpu.copy(&ac, 17, &mut cc2, 3, 10).unwrap();
        gpu.copy(&ag, 17, &mut cg2, 3, 10).unwrap();
        close("copy", &down(gpu, &cg2, 13), &down(&cpu, &cc2, 13), 1e-6);
        assert!(gpu.copy(&ag, 17, &mut cg2, 4, 10).is_err(), "a copy past the destination's end");
    }
}

#[test]
fn statistics_and_masks_match_the_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend;
    let n = 176;
    for rows in [1usize, 7, 150] {
        let mut a = vals(rows * n, rows as u64);
        a[..n].iter_mut().for_each(|v| *v = 0.0); // a zero row
        let (ac, ag) = (cpu.upload(&a).unwrap(), gpu.upload(&a).unwrap());
        let acc0 = vals(3 + 2 * n, 9);
        let (mut sc, mut sg) = (cpu.upload(&acc0).unwrap(), gpu.upload(&acc0).unwrap());
        cpu.observe(&ac, rows, n, &mut sc, 3).unwrap();
        gpu.observe(&ag, rows, n, &mut sg, 3).unwrap();
        close(&format!("observe rows={rows}"), &down(gpu, &sg, 3 + 2 * n), &down(&cpu, &sc, 3 + 2 * n), 1e-5);
    }
    let (d, rows) = (16, 4);
    let w = vals(n * d, 1);
    let m = gpu.matrix(tensor(&w, n, d, DType::F32)).unwrap();
    let mc = cpu.matrix(tensor(&w, n, d, DType::F32)).unwrap();
    let kept: Vec<u32> = (0..n as u32).filter(|j| j % 5 == 0).collect();
    let keep_row: Vec<f32> = (0..n).map(|j| if j % 5 == 0 { 1.0 } else { 0.0 }).collect();
    let wg = crate::kernels::FfnWeights {
        gate: &m,
        up: &m,
        down_t: &m,
        down: None,
        gate_bias: None,
        up_bias: None,
        act: Activation::Silu,
    };
    let wc = crate::kernels::FfnWeights {
        gate: &mc,
        up: &mc,
        down_t: &mc,
        down: None,
        gate_bias: None,
        up_bias: None,
        act: Activation::Silu,
    };
    let (mut sc, mut sg) = (cpu.new_ffn_scratch(), gpu.new_ffn_scratch());
    cpu.prepare_ffn(&wc, Some(&kept), &keep_row, 0.0, 1, &mut sc).unwrap();
    gpu.prepare_ffn(&wg, Some(&kept), &keep_row, 0.0, 1, &mut sg).unwrap();
    let a = vals(rows * n, 2);
    let (mut ac, mut ag) = (cpu.upload(&a).unwrap(), gpu.upload(&a).unwrap());
    cpu.mask_cols(&mut ac, rows, n, &sc).unwrap();
    gpu.mask_cols(&mut ag, rows, n, &sg).unwrap();
    close("mask_cols", &down(gpu, &ag, rows * n), &down(&cpu, &ac, rows * n), 0.0);
}

#[test]
fn attention_decode_and_prefill_match_the_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend;
    let shapes = [
        AttnShape { heads: 4, kv_heads: 2, head_dim: 16, scale: 0.25, softcap: None, window: None },
        AttnShape { heads: 8, kv_heads: 1, head_dim: 64, scale: 0.125, softcap: Some(30.0), window: Some(40) },
        AttnShape { heads: 3, kv_heads: 3, head_dim: 6, scale: 0.4, softcap: None, window: Some(7) },
        AttnShape { heads: 32, kv_heads: 8, head_dim: 128, scale: 0.088, softcap: None, window: None },
        AttnShape { heads: 8, kv_heads: 4, head_dim: 256, scale: 0.0625, softcap: Some(50.0), window: None },
    ];
    let capacity = 700;
    for s in shapes {
        let (qd, kvd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let mk = |be: &dyn Backend| {
            (be.zeros(capacity * kvd).unwrap(), be.zeros(capacity * kvd).unwrap(), be.new_step(300).unwrap())
        };
        let (mut kc_c, mut vc_c, mut st_c) = mk(&cpu);
        let (mut kc_g, mut vc_g, mut st_g) = mk(gpu);
        // A prefill of 300 rows, then single rows at 300.. (two decode splits and more).
        let mut start = 0;
        for (step, rows) in [(0, 300usize), (1, 1), (2, 1), (3, 5), (4, 1)] {
            let (q, k, v) = (vals(rows * qd, 10 + step), vals(rows * kvd, 20 + step), vals(rows * kvd, 30 + step));
            let toks = vec![0u32; rows];
            cpu.set_step(&mut st_c, &toks, start).unwrap();
            gpu.set_step(&mut st_g, &toks, start).unwrap();
            let up = |be: &dyn Backend| {
                (be.upload(&q).unwrap(), be.upload(&k).unwrap(), be.upload(&v).unwrap(), be.zeros(rows * qd).unwrap())
            };
            let (qc, kc, vc, mut oc) = up(&cpu);
            let (qg, kg, vg, mut og) = up(gpu);
            cpu.attention(&s, &st_c, rows, &qc, &kc, &vc, &mut kc_c, &mut vc_c, &mut oc).unwrap();
            gpu.attention(&s, &st_g, rows, &qg, &kg, &vg, &mut kc_g, &mut vc_g, &mut og).unwrap();
            let what = format!("attention {s:?} rows {rows} at {start}");
            close(&what, &down(gpu, &og, rows * qd), &down(&cpu, &oc, rows * qd), 1e-4);
            start += rows;
        }
        close("k cache", &down(gpu, &kc_g, start * kvd), &down(&cpu, &kc_c, start * kvd), 0.0);
    }
}

#[test]
fn argmax_and_sampling() {
    let Some(gpu) = backend() else { return };
    let mut x = vals(50_000, 3);
    x[777] = 5.0;
    x[40_000] = 5.0;
    let xg = gpu.upload(&x).unwrap();
    assert_eq!(gpu.argmax(&xg, x.len()).unwrap(), 777);
    assert_eq!(
        gpu.argmax(&xg, 700).unwrap() as usize,
        (0..700).max_by(|&a, &b| x[a].total_cmp(&x[b]).then(b.cmp(&a))).unwrap()
    );
    let draw = |top_k, top_p, min_p, u| Draw { temperature: 0.8, top_k, top_p, min_p, u };
    // top_k 1 is the argmax; the same u gives the same token; every draw is a candidate.
    assert_eq!(gpu.sample(&xg, x.len(), &draw(1, 1.0, 0.0, 0.5)).unwrap().unwrap(), 777);
    for (k, p, m) in [(0, 1.0, 0.0), (50, 0.9, 0.0), (0, 0.5, 0.0), (20, 1.0, 0.3)] {
        let mut seen = std::collections::HashSet::new();
        for i in 0..20 {
            let u = i as f32 / 20.0;
            let a = gpu.sample(&xg, x.len(), &draw(k, p, m, u)).unwrap().unwrap();
            let b = gpu.sample(&xg, x.len(), &draw(k, p, m, u)).unwrap().unwrap();
            assert_eq!(a, b, "the same draw twice");
            assert!((a as usize) < x.len());
            seen.insert(a);
        }
        if k == 50 {
            // Every draw among the 50 largest logits.
            let mut order: Vec<usize> = (0..x.len()).collect();
            order.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
            let top: std::collections::HashSet<u32> = order[..50].iter().map(|&i| i as u32).collect();
            assert!(seen.is_subset(&top), "top-k 50 drew outside the 50 largest");
        }
    }
}

#[test]
fn recorded_steps_replay_like_plain_ones() {
    let Some(gpu) = backend() else { return };
    let (d, n, vocab, capacity) = (64usize, 176usize, 50usize, 300usize);
    let s = AttnShape { heads: 4, kv_heads: 2, head_dim: 16, scale: 0.25, softcap: None, window: None };
    let table = gpu.matrix(tensor(&vals(vocab * d, 1), vocab, d, DType::BF16)).unwrap();
    let wq = gpu.matrix(tensor(&vals(d * d, 2), d, d, DType::BF16)).unwrap();
    let wk = gpu.matrix(tensor(&vals(32 * d, 3), 32, d, DType::BF16)).unwrap();
    let (g, u, dn) = (
        gpu.matrix(tensor(&vals(n * d, 4), n, d, DType::BF16)).unwrap(),
        gpu.matrix(tensor(&vals(n * d, 5), n, d, DType::BF16)).unwrap(),
        gpu.matrix(tensor(&vals(n * d, 6), n, d, DType::BF16)).unwrap(),
    );
    let w = crate::kernels::FfnWeights {
        gate: &g,
        up: &u,
        down_t: &dn,
        down: None,
        gate_bias: None,
        up_bias: None,
        act: Activation::Silu,
    };
    let kept: Vec<u32> = (0..n as u32).filter(|j| j % 2 == 0).collect();
    let keep_row: Vec<f32> = (0..n).map(|j| (j % 2 == 0) as u32 as f32).collect();
    // Tokens 0-2: the kept half, no gate; tokens 3-5: every neuron, gated (a recording made for the
    // first selection reads the second's threshold).
    let gate = 0.5;
    let run = |use_graph: bool| -> (Vec<Vec<f32>>, (u64, u64)) {
        let mut graphs: Graphs = None;
        let mut step = gpu.new_step(1).unwrap();
        let mut ffn = gpu.new_ffn_scratch();
        let (mut x, mut q, mut k, mut v, mut ctx, mut out) = (
            gpu.zeros(d).unwrap(),
            gpu.zeros(d).unwrap(),
            gpu.zeros(32).unwrap(),
            gpu.zeros(32).unwrap(),
            gpu.zeros(d).unwrap(),
            gpu.zeros(d).unwrap(),
        );
        let (mut kc, mut vc) = (gpu.zeros(capacity * 32).unwrap(), gpu.zeros(capacity * 32).unwrap());
        let mut outs = Vec::new();
        for t in 0..6usize {
            gpu.set_step(&mut step, &[(t * 7 % vocab) as u32], t).unwrap();
            let (sel, t_gate) = if t < 3 { (Some(&kept[..]), 0.0) } else { (None, gate) };
            gpu.prepare_ffn(&w, sel, &keep_row, t_gate, (t / 3) as u64, &mut ffn).unwrap();
            let mut body = || {
                gpu.embed(&table, &step, 1, Some(2.0), &mut x)?;
                gpu.linear(&wq, None, &x, 1, &mut q)?;
                gpu.linear3([(&wk, None), (&wk, None), (&wk, None)], &x, [&mut k, &mut v, &mut ctx])?;
                gpu.attention(&s, &step, 1, &q, &k, &v, &mut kc, &mut vc, &mut ctx)?;
                gpu.add(&mut x, &ctx, d)?;
                gpu.ffn_decode(&w, true, &mut ffn, &x, &mut out)
            };
            if use_graph {
                gpu.run_graph(&mut graphs, 1, &mut body).unwrap();
            } else {
                body().unwrap();
            }
            outs.push(down(gpu, &out, d));
        }
        (outs, gpu.ffn_counts(&ffn, 1).unwrap())
    };
    let ((plain, counted), (replayed, recounted)) = (run(false), run(true));
    for (t, (a, b)) in plain.iter().zip(&replayed).enumerate() {
        close(&format!("recorded step {t}"), b, a, 0.0);
    }
    assert_eq!(recounted, counted, "gate counts, recorded vs plain");
    assert!(counted.0 == 3 && counted.1 > 0 && counted.1 < 3 * n as u64, "gate counts {counted:?}");
}

#[test]
fn a_machine_without_a_driver_gets_a_clear_error() {
    if device_count().unwrap() > 0 {
        return;
    }
    let e = CudaBackend::new(0).err().expect("no device, no backend");
    let msg = e.to_string();
    assert!(matches!(e, crate::error::Error::InvalidArgument(_)), "{e:?}");
    assert!(msg.contains("device 'cuda:0' is not available"), "{msg}");
}
