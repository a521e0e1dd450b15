//! The CPU backend ([`CpuBackend`]) and its kernels on plain slices: weights in f32, bf16, f16 or
//! llama.cpp's quantized blocks ([`crate::quant`]), activations and accumulation in f32.

use crate::error::{Error, Result};
#[cfg(test)]
use crate::quant::QType;
use crate::quant::{ActsType, QActs, QSlice};
use candle_core::{CpuStorage, Storage, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;
use std::ops::Range;

/// A borrowed view of a 2-D weight matrix's elements, row-major.
#[derive(Clone, Copy)]
pub enum WeightSlice<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
    /// Quantized blocks: every row is `cols / block` whole blocks.
    Q(QSlice<'a>),
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

mod backend;
mod gated;
mod gemm;
mod memory;
#[cfg(target_arch = "x86_64")]
mod qx86;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use backend::{activate, CpuBackend, KeptRows, COMPACT_BELOW_BYTES};
pub use gated::{ffn_decode_gated, GatedScratch};
pub use gemm::{matmul, matmul_on, prefill_path, PREFILL_PATHS};
pub use memory::{huge_page_copy, huge_page_vec, on_huge_pages, RowCopy};

/// One instruction-set path of the inner loops: dot products of a weight row with f32 activations,
/// `y += a * row`, and a plain sum, for f32, bf16 and f16 rows; for quantized rows, dot products
/// with activations quantized to 8 bits per block, and `y += a * row`. A table is only handed out
/// ([`kernels`], [`available`]) when the CPU has its features, which makes calling it sound.
/// The row entries also take the row the caller reads next, which they start prefetching.
#[derive(Clone, Copy)]
pub struct Kernels {
    /// `portable`, `avx2` (AVX2 + FMA + F16C), `avx512` (AVX-512F on top of those) or `avx512bf16`
    /// (`avx512` plus `vdpbf16ps` for bf16 rows); for the table in use, the paths it combines.
    pub name: &'static str,
    /// The path of each weight dtype's loops, in [`DTYPES`] order.
    pub paths: [&'static str; 4],
    dot_f32: unsafe fn(&[f32], &[f32], &[f32]) -> f32,
    dot_bf16: unsafe fn(&[bf16], &[f32], &[bf16]) -> f32,
    dot_f16: unsafe fn(&[f16], &[f32], &[f16]) -> f32,
    /// Native bf16: a bf16 row with bf16 activations, f32 accumulation (`vdpbf16ps`). Where a
    /// path has it, matrix-vector products over bf16 rows round their input to bf16 once and use it.
    dot_bf16_bf16: Option<unsafe fn(&[bf16], &[bf16], &[bf16]) -> f32>,
    axpy_f32: unsafe fn(f32, &[f32], &mut [f32], &[f32]),
    axpy_bf16: unsafe fn(f32, &[bf16], &mut [f32], &[bf16]),
    axpy_f16: unsafe fn(f32, &[f16], &mut [f32], &[f16]),
    sum_f32: unsafe fn(&[f32]) -> f32,
    /// A quantized row (whole blocks) against activations quantized for its type, prefetching on
    /// into the raw bytes `next`.
    dot_q: unsafe fn(QSlice<'_>, &QActs, &[u8]) -> f32,
    axpy_q: unsafe fn(f32, QSlice<'_>, &mut [f32], &[u8]),
    /// `out[r] = row r . x` for the `out.len()` consecutive rows (of `cols` values) of a quantized
    /// matrix, with `x` quantized for its type: several rows at a time sharing the activations.
    gemv_q: unsafe fn(QSlice<'_>, usize, &QActs, &mut [f32]),
    /// As `gemv_q` with f32 activations (weights widened in registers): the other scheme, for
    /// exact activations (the prefill's logits) and for the kernels bench's comparison.
    gemv_qf: unsafe fn(QSlice<'_>, usize, &[f32], &mut [f32]),
}

/// The weight dtypes of the kernel table, in the order of [`Kernels::paths`] (`quant`: every
/// block-quantized type).
pub const DTYPES: [&str; 4] = ["f32", "bf16", "f16", "quant"];

const PORTABLE: Kernels = Kernels {
    name: "portable",
    paths: ["portable"; 4],
    dot_f32: |r, x, _| dot_portable(r, x),
    dot_bf16: |r, x, _| dot_half(r, x, |s, d| s.convert_to_f32_slice(d)),
    dot_f16: |r, x, _| dot_half(r, x, |s, d| s.convert_to_f32_slice(d)),
    dot_bf16_bf16: None,
    axpy_f32: |a, r, y, _| axpy_portable(a, r, y),
    axpy_bf16: |a, r, y, _| axpy_half(a, r, y, |s, d| s.convert_to_f32_slice(d)),
    axpy_f16: |a, r, y, _| axpy_half(a, r, y, |s, d| s.convert_to_f32_slice(d)),
    sum_f32: sum_portable,
    dot_q: |w, a, _| crate::quant::dot_portable(w, a),
    axpy_q: |a, w, y, _| axpy_q_with(a, w, y, axpy_portable),
    gemv_q: |w, cols, a, out| gemv_q_rows(w, cols, a, out, crate::quant::dot_portable),
    gemv_qf: |w, cols, x, out| gemv_qf_rows(w, cols, x, out, dot_portable),
};

#[cfg(target_arch = "x86_64")]
const AVX2: Kernels = Kernels {
    name: "avx2",
    paths: ["avx2"; 4],
    dot_f32: x86::dot_f32,
    dot_bf16: x86::dot_bf16,
    dot_f16: x86::dot_f16,
    dot_bf16_bf16: None,
    axpy_f32: x86::axpy_f32,
    axpy_bf16: x86::axpy_bf16,
    axpy_f16: x86::axpy_f16,
    sum_f32: x86::sum_f32,
    dot_q: |w, a, n| unsafe { dot_q_x86(w, a, n, false) },
    axpy_q: axpy_q_x86,
    gemv_q: |w, cols, a, out| unsafe { gemv_q_x86(w, cols, a, out, false) },
    gemv_qf: |w, cols, x, out| unsafe { gemv_qf_x86(w, cols, x, out, false) },
};

#[cfg(target_arch = "x86_64")]
const AVX512: Kernels = Kernels {
    name: "avx512",
    paths: ["avx512"; 4],
    dot_f32: x86::dot_f32_512,
    dot_bf16: x86::dot_bf16_512,
    dot_f16: x86::dot_f16_512,
    dot_bf16_bf16: None,
    axpy_f32: x86::axpy_f32_512,
    axpy_bf16: x86::axpy_bf16_512,
    axpy_f16: x86::axpy_f16_512,
    sum_f32: x86::sum_f32_512,
    dot_q: |w, a, n| unsafe { dot_q_x86(w, a, n, vnni()) },
    axpy_q: axpy_q_x86,
    gemv_q: |w, cols, a, out| unsafe { gemv_q_x86(w, cols, a, out, vnni()) },
    gemv_qf: |w, cols, x, out| unsafe { gemv_qf_x86(w, cols, x, out, true) },
};

/// AVX-512 with `avx512_bf16`: bf16 rows against bf16 activations with `vdpbf16ps`, no widening.
/// (`y += a * row` keeps the widening loop: its output is f32.)
#[cfg(target_arch = "x86_64")]
const AVX512BF16: Kernels =
    Kernels { name: "avx512bf16", paths: ["avx512bf16"; 4], dot_bf16_bf16: Some(x86::dot_bf16_dp), ..AVX512 };

/// Whether the CPU has AVX-512 VNNI (on 256-bit vectors: `avx512vl`), for the quantized dots.
#[cfg(target_arch = "x86_64")]
fn vnni() -> bool {
    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

/// Whether the VNNI matrix-vector loops take 512-bit vectors (two blocks per `vpdpbusd`, weights
/// offset to unsigned instead of the sign trick; needs AVX-512 BW too). Measured against the 256-bit
/// loops on an Intel Xeon (BENCHMARKS.md, issue 13): 1.24x on Q4_0, 1.27x on Q5_0, 1.15x on Q8_0 on
/// one thread, Q4_1 even, none slower. `TDA_ENGINE_QUANT_WIDTH=256` keeps the 256-bit loops.
#[cfg(target_arch = "x86_64")]
fn wide_vnni() -> bool {
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WIDE.get_or_init(|| {
        vnni()
            && is_x86_feature_detected!("avx512bw")
            && std::env::var("TDA_ENGINE_QUANT_WIDTH").map_or(true, |v| v.trim() != "256")
    })
}

/// A quantized row's dot product on the x86 paths: our integer loops for the 32-element formats
/// (VNNI's `vpdpbusd` where `vnni`, else AVX2's `maddubs`), candle's AVX2 loops for the K-quants
/// (and its portable loop for Q5_1).
#[cfg(target_arch = "x86_64")]
unsafe fn dot_q_x86(w: QSlice<'_>, a: &QActs, next: &[u8], vnni: bool) -> f32 {
    use crate::quant::QType;
    let (wb, ab) = (w.bytes(), a.bytes());
    // SAFETY: the tables holding this exist only on CPUs with AVX2, FMA and F16C (and VNNI where
    // `vnni`); the activations were quantized for this type, with at least as many blocks.
    unsafe {
        match (w.qtype(), vnni) {
            (QType::Q4_0, false) => qx86::dot_q4_0(wb, ab, next),
            (QType::Q4_0, true) => qx86::dot_q4_0_vnni(wb, ab, next),
            (QType::Q4_1, false) => qx86::dot_q4_1(wb, ab, next),
            (QType::Q4_1, true) => qx86::dot_q4_1_vnni(wb, ab, next),
            (QType::Q5_0, false) => qx86::dot_q5_0(wb, ab, next),
            (QType::Q5_0, true) => qx86::dot_q5_0_vnni(wb, ab, next),
            (QType::Q8_0, false) => qx86::dot_q8_0(wb, ab, next),
            (QType::Q8_0, true) => qx86::dot_q8_0_vnni(wb, ab, next),
            _ => crate::quant::dot_candle(w, a),
        }
    }
}

/// [`Kernels::gemv_q`] on the x86 paths: our multi-row loops for the 32-element formats, one row
/// at a time through [`dot_q_x86`] for the others.
#[cfg(target_arch = "x86_64")]
unsafe fn gemv_q_x86(w: QSlice<'_>, cols: usize, a: &QActs, out: &mut [f32], vnni: bool) {
    use crate::quant::QType;
    let (wb, ab, rb) = (w.bytes(), a.bytes(), w.qtype().row_bytes(cols));
    // SAFETY: as in `dot_q_x86`; `w` holds `out.len()` rows of `rb` bytes.
    unsafe {
        match (w.qtype(), vnni) {
            (QType::Q4_0, false) => qx86::gemv_q4_0(wb, rb, ab, out),
            (QType::Q4_0, true) if wide_vnni() => qx86::gemv_q4_0_512(wb, rb, ab, out),
            (QType::Q4_1, true) if wide_vnni() => qx86::gemv_q4_1_512(wb, rb, ab, out),
            (QType::Q5_0, true) if wide_vnni() => qx86::gemv_q5_0_512(wb, rb, ab, out),
            (QType::Q8_0, true) if wide_vnni() => qx86::gemv_q8_0_512(wb, rb, ab, out),
            (QType::Q4_0, true) => qx86::gemv_q4_0_vnni(wb, rb, ab, out),
            (QType::Q4_1, false) => qx86::gemv_q4_1(wb, rb, ab, out),
            (QType::Q4_1, true) => qx86::gemv_q4_1_vnni(wb, rb, ab, out),
            (QType::Q5_0, false) => qx86::gemv_q5_0(wb, rb, ab, out),
            (QType::Q5_0, true) => qx86::gemv_q5_0_vnni(wb, rb, ab, out),
            (QType::Q8_0, false) => qx86::gemv_q8_0(wb, rb, ab, out),
            (QType::Q8_0, true) => qx86::gemv_q8_0_vnni(wb, rb, ab, out),
            _ => gemv_q_rows(w, cols, a, out, |r, a| dot_q_x86(r, a, &[], vnni)),
        }
    }
}

/// [`Kernels::gemv_qf`] on the x86 paths: our loops for the 32-element formats (512-bit where
/// `wide`), the others dequantized a few blocks at a time on the stack.
#[cfg(target_arch = "x86_64")]
unsafe fn gemv_qf_x86(w: QSlice<'_>, cols: usize, x: &[f32], out: &mut [f32], wide: bool) {
    use crate::quant::QType;
    let (wb, rb) = (w.bytes(), w.qtype().row_bytes(cols));
    // SAFETY: the tables holding this exist only on CPUs with AVX2, FMA and F16C (and AVX-512F
    // where `wide`); `w` holds `out.len()` rows of `rb` bytes and `x` a row's worth of values.
    unsafe {
        match (w.qtype(), wide) {
            (QType::Q4_0, false) => qx86::gemv_f_q4_0(wb, rb, x, out),
            (QType::Q4_0, true) => qx86::gemv_f_q4_0_512(wb, rb, x, out),
            (QType::Q4_1, false) => qx86::gemv_f_q4_1(wb, rb, x, out),
            (QType::Q4_1, true) => qx86::gemv_f_q4_1_512(wb, rb, x, out),
            (QType::Q5_0, false) => qx86::gemv_f_q5_0(wb, rb, x, out),
            (QType::Q5_0, true) => qx86::gemv_f_q5_0_512(wb, rb, x, out),
            (QType::Q8_0, false) => qx86::gemv_f_q8_0(wb, rb, x, out),
            (QType::Q8_0, true) => qx86::gemv_f_q8_0_512(wb, rb, x, out),
            (_, false) => gemv_qf_rows(w, cols, x, out, |a, b| x86::dot_f32(a, b, &[])),
            (_, true) => gemv_qf_rows(w, cols, x, out, |a, b| x86::dot_f32_512(a, b, &[])),
        }
    }
}

/// `out[r] = row r . x` with f32 activations, each row dequantized up to 256 values at a time on
/// the stack.
fn gemv_qf_rows(w: QSlice<'_>, cols: usize, x: &[f32], out: &mut [f32], dot: impl Fn(&[f32], &[f32]) -> f32) {
    let b = w.qtype().block();
    let (bpr, per) = (cols / b, (256 / b).max(1));
    let mut buf = [0f32; 256];
    for (r, o) in out.iter_mut().enumerate() {
        let mut s = 0f32;
        for i in (0..bpr).step_by(per) {
            let j = (i + per).min(bpr);
            let v = &mut buf[..(j - i) * b];
            w.blocks(r * bpr + i..r * bpr + j).dequantize(0, v);
            s += dot(v, &x[i * b..j * b]);
        }
        *o = s;
    }
}

/// `out[r] = dot(row r, a)` one row at a time.
fn gemv_q_rows(w: QSlice<'_>, cols: usize, a: &QActs, out: &mut [f32], dot: impl Fn(QSlice<'_>, &QActs) -> f32) {
    let bpr = cols / w.qtype().block();
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot(w.blocks(r * bpr..(r + 1) * bpr), a);
    }
}

/// `y += a * row` for a quantized row on the x86 paths.
#[cfg(target_arch = "x86_64")]
unsafe fn axpy_q_x86(a: f32, w: QSlice<'_>, y: &mut [f32], next: &[u8]) {
    // SAFETY: as in `dot_q_x86`.
    unsafe {
        match w {
            QSlice::Q8_0(_) => qx86::axpy_q8_0(a, w.bytes(), y, next),
            _ => axpy_q_with(a, w, y, |a, x, y| x86::axpy_f32(a, x, y, &[])),
        }
    }
}

/// `y += a * row` for a quantized row, one block at a time: dequantized on the stack, then `axpy`.
fn axpy_q_with(a: f32, w: QSlice<'_>, y: &mut [f32], axpy: impl Fn(f32, &[f32], &mut [f32])) {
    let b = w.qtype().block();
    let mut buf = [0f32; 256];
    for (i, ys) in y[..w.len() * b].chunks_exact_mut(b).enumerate() {
        let block = &mut buf[..b];
        w.blocks(i..i + 1).dequantize(0, block);
        axpy(a, block, ys);
    }
}

/// Every path this CPU can run, slowest first.
pub fn available() -> Vec<&'static Kernels> {
    #[allow(unused_mut)]
    let mut v = vec![&PORTABLE];
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        v.push(&AVX2);
        if is_x86_feature_detected!("avx512f") {
            v.push(&AVX512);
            if is_x86_feature_detected!("avx512bf16") {
                v.push(&AVX512BF16);
            }
        }
    }
    v
}

/// The names of all paths, for messages about the ones this CPU lacks.
pub const PATHS: [&str; 4] = ["portable", "avx2", "avx512", "avx512bf16"];

/// The CPU as the path rules see it: vendor and family from CPUID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpu {
    /// `GenuineIntel`, `AuthenticAMD`, ... (empty off x86).
    pub vendor: String,
    /// The display family (base family plus extended family): 6 for Intel's cores, 0x17 for
    /// AMD Zen 1/2, 0x19 for Zen 3/4, 0x1A for Zen 5.
    pub family: u32,
}

/// This machine's [`Cpu`].
pub fn cpu() -> Cpu {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaves 0 and 1 exist on every x86-64 CPU.
        let (l0, l1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
        let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        let base = (l1.eax >> 8) & 0xf;
        let family = if base == 0xf { base + ((l1.eax >> 20) & 0xff) } else { base };
        Cpu { vendor: String::from_utf8_lossy(&vendor).into_owned(), family }
    }
    #[cfg(not(target_arch = "x86_64"))]
    Cpu { vendor: String::new(), family: 0 }
}

/// The path for weights of `dtype` (of [`DTYPES`]) on `cpu`, which has the paths `have`; and why.
///
/// A rule on the vendor, the family and the features, fixed in code from measurements, never a
/// timing at start-up (noise would then change the path, and with it the floats, from run to run):
/// - **Intel** (Xeon, AVX-512F, no avx512_bf16, 2 threads): AVX-512 and AVX2 both reach the
///   bandwidth on the 7B shape (GEMV 11008 x 4096: f32 91% / 91%, bf16 93% / 93%, f16 89% / 88%);
///   AVX-512 is ahead on narrow rows (49152 x 576: f32 94% / 92%, f16 79% / 76%). AVX-512.
/// - **AMD with AVX-512** (Zen 4, family 0x19; issue 12's figures): AVX-512 loses to AVX2 on
///   half-precision rows (GEMV 11008 x 4096: bf16 77% / 112%, f16 57% / 95% of the old probe);
///   Zen 4 runs a 512-bit operation as two 256-bit halves, and the widening doubles the operations
///   per byte. AVX2 for f32, bf16 and f16, whatever the family.
/// - **avx512_bf16** (Zen 4, Sapphire Rapids and later) takes the bf16 rows on either vendor:
///   `vdpbf16ps` multiplies 32 bf16 pairs per instruction with no widening at all, which is what
///   llama.cpp does there (issue 12: 39 GB/s on that Zen 4, above our AVX2 loop's rate). No
///   machine of these sessions has had the instruction: this one choice rests on the peer's figure.
/// - Anything else: the widest path it has short of avx512bf16; portable without AVX2.
pub fn rule(cpu: &Cpu, have: &[&str], dtype: &str) -> (&'static str, &'static str) {
    let has = |p: &str| have.contains(&p);
    if dtype == "bf16" && has("avx512bf16") {
        return ("avx512bf16", "vdpbf16ps: bf16 pairs, no widening (llama.cpp's path on such CPUs)");
    }
    let amd = cpu.vendor == "AuthenticAMD";
    if amd && has("avx2") {
        return ("avx2", "AMD: 512-bit operations run as two halves; AVX2 measured faster on Zen 4");
    }
    if cpu.vendor == "GenuineIntel" && has("avx512") {
        return ("avx512", "Intel: AVX-512 at least as fast as AVX2 on every shape measured");
    }
    if has("avx2") {
        return ("avx2", "the widest path measured on this kind of CPU");
    }
    ("portable", "no AVX2: the portable loops")
}

/// The table of `path` (of [`PATHS`]) if this CPU has it.
fn table(path: &str) -> Option<&'static Kernels> {
    available().into_iter().find(|k| k.name == path)
}

/// One table from a path per dtype: each dtype's loops from its own path (the sum with f32's).
fn combine(paths: [&'static str; 4]) -> Kernels {
    let t = paths.map(|p| table(p).unwrap_or(&PORTABLE));
    let name = if paths.iter().all(|p| *p == paths[0]) {
        paths[0]
    } else {
        // Once per process: the table in use is built once.
        Box::leak(
            DTYPES.iter().zip(paths).map(|(d, p)| format!("{d}:{p}")).collect::<Vec<_>>().join(",").into_boxed_str(),
        )
    };
    Kernels {
        name,
        paths,
        dot_f32: t[0].dot_f32,
        axpy_f32: t[0].axpy_f32,
        sum_f32: t[0].sum_f32,
        dot_bf16: t[1].dot_bf16,
        axpy_bf16: t[1].axpy_bf16,
        dot_bf16_bf16: t[1].dot_bf16_bf16,
        dot_f16: t[2].dot_f16,
        axpy_f16: t[2].axpy_f16,
        dot_q: t[3].dot_q,
        axpy_q: t[3].axpy_q,
        gemv_q: t[3].gemv_q,
        gemv_qf: t[3].gemv_qf,
    }
}

/// The paths `TDA_ENGINE_KERNELS` asks for: one path for every dtype (`avx2`), or some dtypes'
/// (`bf16=avx2,f16=avx512`; the others keep `default`). A path the CPU lacks falls back to the default.
fn forced(spec: &str, default: [&'static str; 4]) -> [&'static str; 4] {
    let known = |p: &str| PATHS.iter().copied().find(|k| *k == p).filter(|k| table(k).is_some());
    let mut out = default;
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            None => {
                if let Some(p) = known(part) {
                    out = [p; 4];
                }
            }
            Some((d, p)) => {
                if let (Some(i), Some(p)) = (DTYPES.iter().position(|x| *x == d.trim()), known(p.trim())) {
                    out[i] = p;
                }
            }
        }
    }
    out
}

/// The table the kernels use: for each weight dtype the path of [`rule`] on this CPU, or the one
/// `TDA_ENGINE_KERNELS` names (see [`forced`]). `TDA_ENGINE_PORTABLE=1` is the same as
/// `TDA_ENGINE_KERNELS=portable`. Chosen once per process.
#[inline]
pub fn kernels() -> &'static Kernels {
    static CHOSEN: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    CHOSEN.get_or_init(|| {
        let default = chosen_paths();
        let wanted = match std::env::var("TDA_ENGINE_KERNELS") {
            Ok(spec) => Some(spec),
            Err(_) => std::env::var_os("TDA_ENGINE_PORTABLE").map(|_| "portable".to_string()),
        };
        combine(wanted.map_or(default, |w| forced(&w, default)))
    })
}

/// The paths [`rule`] chooses on this CPU, per dtype ([`DTYPES`] order).
pub fn chosen_paths() -> [&'static str; 4] {
    let cpu = cpu();
    let have: Vec<&str> = available().iter().map(|k| k.name).collect();
    DTYPES.map(|d| rule(&cpu, &have, d).0)
}

impl Kernels {
    /// `a . b` over their common length.
    #[inline]
    pub fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        // SAFETY: a table exists only for CPUs with its features (see `available`); equal lengths.
        unsafe { (self.dot_f32)(&a[..n], &b[..n], &[]) }
    }

    /// `y += a * x` over their common length.
    #[inline]
    pub fn axpy(&self, a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        // SAFETY: as in `dot`.
        unsafe { (self.axpy_f32)(a, &x[..n], &mut y[..n], &[]) }
    }

    /// The sum of `a`.
    #[inline]
    pub fn sum(&self, a: &[f32]) -> f32 {
        // SAFETY: as in `dot`.
        unsafe { (self.sum_f32)(a) }
    }

    /// `W[r, :] . x` for a row-major matrix with `cols` columns, prefetching on into the rows
    /// `next` (a range of rows, read next in order). Quantized rows quantize `x` for the call
    /// (products over many rows quantize it once: [`Kernels::row_dot_acts`]).
    #[inline]
    pub fn row_dot(&self, w: WeightSlice<'_>, r: usize, cols: usize, x: &[f32], next: Range<usize>) -> f32 {
        let x = &x[..cols];
        let (span, nspan) = (r * cols..(r + 1) * cols, next.start * cols..next.end * cols);
        // SAFETY: as in `dot`; row and x have `cols` elements.
        unsafe {
            match w {
                WeightSlice::F32(v) => (self.dot_f32)(&v[span], x, &v[nspan]),
                WeightSlice::BF16(v) => (self.dot_bf16)(&v[span], x, &v[nspan]),
                WeightSlice::F16(v) => (self.dot_f16)(&v[span], x, &v[nspan]),
                WeightSlice::Q(_) => with_acts(self, &[w], x, |a| self.row_dot_acts(w, r, cols, a, next)),
            }
        }
    }

    /// Row `r` of quantized blocks `q` (rows of `cols` elements), and the raw bytes of rows `next`.
    #[inline]
    fn q_rows<'a>(q: QSlice<'a>, r: usize, cols: usize, next: Range<usize>) -> (QSlice<'a>, &'a [u8]) {
        let bpr = cols / q.qtype().block();
        (q.blocks(r * bpr..(r + 1) * bpr), q.blocks(next.start * bpr..next.end * bpr).bytes())
    }

    /// Whether this table's bf16 rows take bf16 activations (`vdpbf16ps`); see [`Acts`].
    #[inline]
    pub fn native_bf16(&self) -> bool {
        self.dot_bf16_bf16.is_some()
    }

    /// `W[r, :] . x` as [`Kernels::row_dot`], with the activations as [`Acts`]: bf16 rows use
    /// `x`'s bf16 copy where the table multiplies bf16 natively.
    #[inline]
    pub fn row_dot_acts(&self, w: WeightSlice<'_>, r: usize, cols: usize, x: &Acts<'_>, next: Range<usize>) -> f32 {
        if let WeightSlice::Q(q) = w {
            let (row, next) = Self::q_rows(q, r, cols, next);
            let acts = x.q[q.qtype().acts().index()].expect("activations quantized for the row's type");
            // SAFETY: as in `dot`; `acts` holds the quantized `x` (`cols` values).
            return unsafe { (self.dot_q)(row, acts, next) };
        }
        match (w, x.bf16, self.dot_bf16_bf16) {
            (WeightSlice::BF16(v), Some(xb), Some(dot)) => {
                let (span, nspan) = (r * cols..(r + 1) * cols, next.start * cols..next.end * cols);
                // SAFETY: as in `dot`; the table exists only on CPUs with avx512_bf16.
                unsafe { dot(&v[span], &xb[..cols], &v[nspan]) }
            }
            _ => self.row_dot(w, r, cols, x.f32, next),
        }
    }

    /// `y += a * W[r, :]`, prefetching on into the rows `next`.
    #[inline]
    pub fn row_axpy(&self, w: WeightSlice<'_>, r: usize, cols: usize, a: f32, y: &mut [f32], next: Range<usize>) {
        let y = &mut y[..cols];
        if let WeightSlice::Q(q) = w {
            let (row, next) = Self::q_rows(q, r, cols, next);
            // SAFETY: as in `dot`; the row has `cols` elements.
            return unsafe { (self.axpy_q)(a, row, y, next) };
        }
        let (span, nspan) = (r * cols..(r + 1) * cols, next.start * cols..next.end * cols);
        // SAFETY: as in `row_dot`.
        unsafe {
            match w {
                WeightSlice::F32(v) => (self.axpy_f32)(a, &v[span], y, &v[nspan]),
                WeightSlice::BF16(v) => (self.axpy_bf16)(a, &v[span], y, &v[nspan]),
                WeightSlice::F16(v) => (self.axpy_f16)(a, &v[span], y, &v[nspan]),
                WeightSlice::Q(_) => unreachable!("handled above"),
            }
        }
    }
}

/// The input of a matrix-vector product: f32, plus its bf16 rounding where the table multiplies
/// bf16 rows natively, plus its 8-bit blocks for each activation type the quantized rows take
/// ([`crate::quant::ActsType`]); each made once per product, not once per row. Up to
/// [`ACTS_ON_STACK`] values the bf16 copy lives on the stack, and the 8-bit blocks in the calling
/// thread's reused buffers: no allocation per token.
pub struct Acts<'a> {
    pub f32: &'a [f32],
    pub bf16: Option<&'a [bf16]>,
    pub q: [Option<&'a QActs>; 3],
}

/// Activations up to this length are rounded to bf16 on the stack.
pub const ACTS_ON_STACK: usize = 8192;

thread_local! {
    /// A thread's buffers of quantized activations, one per [`ActsType`].
    static QACTS: std::cell::RefCell<[QActs; 3]> = std::cell::RefCell::new(ActsType::ALL.map(QActs::new));
}

/// Quantizes `x` into `b`: our AVX2 loop for Q8_0 and Q8_1 on the x86 paths, ggml's reference
/// loop (candle's) otherwise.
fn quantize_acts(k: &Kernels, b: &mut QActs, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if k.paths[3] != "portable" && matches!(b.kind(), ActsType::Q8_0 | ActsType::Q8_1) {
        let with_sum = b.kind() == ActsType::Q8_1;
        // SAFETY: a non-portable table exists only on CPUs with AVX2, FMA and F16C; the buffer
        // holds a block per 32 values.
        return unsafe { qx86::quantize_q8(x, b.blocks_mut(x.len() / 32), with_sum) };
    }
    let _ = k;
    b.quantize(x)
}

/// Runs `f` on `x` as [`Acts`] for the weights `ws` on table `k`.
#[inline]
pub fn with_acts<R>(k: &Kernels, ws: &[WeightSlice<'_>], x: &[f32], f: impl FnOnce(&Acts<'_>) -> R) -> R {
    let mut need = [false; 3];
    for w in ws {
        if let WeightSlice::Q(q) = w {
            need[q.qtype().acts().index()] = true;
        }
    }
    let bf16 = k.native_bf16() && ws.iter().any(|w| matches!(w, WeightSlice::BF16(_)));
    let with_q = |xb: Option<&[bf16]>| -> R {
        if !need.contains(&true) {
            return f(&Acts { f32: x, bf16: xb, q: [None; 3] });
        }
        let run = |bufs: &mut [QActs; 3]| {
            for (b, _) in bufs.iter_mut().zip(need).filter(|(_, n)| *n) {
                quantize_acts(k, b, x);
            }
            let q = [0, 1, 2].map(|i| need[i].then_some(&bufs[i]));
            f(&Acts { f32: x, bf16: xb, q })
        };
        // A task stolen by this thread inside a parallel loop may be another product: then the
        // buffers are in use and this product gets its own.
        QACTS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut bufs) => run(&mut bufs),
            Err(_) => run(&mut ActsType::ALL.map(QActs::new)),
        })
    };
    if !bf16 {
        return with_q(None);
    }
    if x.len() <= ACTS_ON_STACK {
        let mut buf = [bf16::ZERO; ACTS_ON_STACK];
        let b = &mut buf[..x.len()];
        b.convert_from_f32_slice(x);
        with_q(Some(b))
    } else {
        let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        with_q(Some(&b))
    }
}

/// `a . b` on the chosen path.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    kernels().dot(a, b)
}

/// `y += a * x` on the chosen path.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    kernels().axpy(a, x, y)
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

/// Sum with 8 independent accumulators.
#[inline]
pub fn sum_portable(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (c, r) = a.as_chunks::<8>();
    for x in c {
        for l in 0..8 {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + r.iter().sum::<f32>()
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
        WeightSlice::Q(q) => dequantize(q, span.start, out),
    }
}

/// Elements `start..start + out.len()` (whole blocks) of quantized blocks as f32: our AVX2 loop for
/// the 32-element formats where the CPU has it, candle's (ggml's reference) otherwise.
pub fn dequantize(q: QSlice<'_>, start: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        use crate::quant::QType;
        let b = q.qtype().block();
        let w = q.blocks(start / b..(start + out.len()) / b).bytes();
        // SAFETY: the CPU has the features; `out` holds 32 values per block.
        unsafe {
            match q.qtype() {
                QType::Q4_0 => return qx86::dequant_q4_0(w, out),
                QType::Q4_1 => return qx86::dequant_q4_1(w, out),
                QType::Q5_0 => return qx86::dequant_q5_0(w, out),
                QType::Q8_0 => return qx86::dequant_q8_0(w, out),
                _ => {}
            }
        }
    }
    q.dequantize(start, out)
}

/// How far ahead of their loads the SIMD loops prefetch, in bytes. The hardware prefetcher alone
/// keeps too few lines in flight when half-precision widening doubles the instructions per byte,
/// and it stops at every jump between the rows of a sparse set.
pub const PREFETCH_AHEAD: usize = 2048;

impl WeightSlice<'_> {
    /// Bytes of one row of `cols` elements.
    pub fn row_bytes(&self, cols: usize) -> usize {
        match self {
            WeightSlice::F32(_) => 4 * cols,
            WeightSlice::BF16(_) | WeightSlice::F16(_) => 2 * cols,
            WeightSlice::Q(q) => q.qtype().row_bytes(cols),
        }
    }
}

/// Work per rayon task, in multiply-adds; below it a matrix-vector product runs on one thread.
const MIN_PARALLEL_WORK: usize = 1 << 15;

/// `out[r] = W[r, :] . x` for a row-major `rows x cols` matrix, split over threads by rows.
pub fn gemv(w: WeightSlice<'_>, cols: usize, x: &[f32], out: &mut [f32]) {
    gemv_with(kernels(), w, cols, x, out)
}

/// Several matrix-vector products with the same `x` (e.g. the q, k and v projections) as one
/// parallel dispatch: one fork-join per token instead of one per matrix.
pub fn gemv_many(cols: usize, x: &[f32], parts: &mut [(WeightSlice<'_>, &mut [f32])]) {
    let k = kernels();
    // The activations are rounded (bf16) or quantized once for all the parts (up to four; no
    // allocation per token).
    if parts.len() > 4 {
        return parts.par_iter_mut().for_each(|(w, out)| gemv_with(k, *w, cols, x, out));
    }
    let mut ws = [WeightSlice::F32(&[]); 4];
    for (s, (w, _)) in ws.iter_mut().zip(parts.iter()) {
        *s = *w;
    }
    with_acts(k, &ws, &x[..cols], |x| parts.par_iter_mut().for_each(|(w, out)| gemv_acts(k, *w, cols, x, out)));
}

/// [`gemv`] on a given path.
pub fn gemv_with(k: &Kernels, w: WeightSlice<'_>, cols: usize, x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(x.len(), cols);
    with_acts(k, &[w], &x[..cols], |x| gemv_acts(k, w, cols, x, out))
}

/// `run(r0, chunk)` over chunks of `out` (the rows of a `cols`-wide matrix from `r0` on): on this
/// thread when the product is small, else in parallel chunks of at least [`MIN_PARALLEL_WORK`].
fn over_row_chunks(cols: usize, out: &mut [f32], run: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len();
    if rows * cols < 2 * MIN_PARALLEL_WORK {
        return run(0, out);
    }
    let rows_per_task = (MIN_PARALLEL_WORK / cols.max(1)).clamp(4, rows.div_ceil(rayon::current_num_threads()));
    out.par_chunks_mut(rows_per_task).enumerate().for_each(|(c, chunk)| run(c * rows_per_task, chunk));
}

/// `out = W x` for a quantized `W` with f32 activations (weights widened in registers, no
/// activation rounding), on `k`'s loops, over all threads.
pub fn gemv_float_acts_with(k: &Kernels, w: QSlice<'_>, cols: usize, x: &[f32], out: &mut [f32]) {
    let bpr = cols / w.qtype().block();
    // SAFETY: as in `Kernels::dot`; each chunk's rows lie inside the matrix.
    over_row_chunks(cols, out, |r0, out| unsafe {
        (k.gemv_qf)(w.blocks(r0 * bpr..(r0 + out.len()) * bpr), cols, x, out)
    });
}

fn gemv_acts(k: &Kernels, w: WeightSlice<'_>, cols: usize, x: &Acts<'_>, out: &mut [f32]) {
    if let WeightSlice::Q(q) = w {
        let (bpr, acts) = (cols / q.qtype().block(), x.q[q.qtype().acts().index()].expect("quantized activations"));
        // SAFETY: as in `Kernels::dot`; each chunk's rows lie inside the matrix.
        return over_row_chunks(cols, out, |r0, out| unsafe {
            (k.gemv_q)(q.blocks(r0 * bpr..(r0 + out.len()) * bpr), cols, acts, out)
        });
    }
    let rows = out.len();
    over_row_chunks(cols, out, |r0, chunk| {
        for (i, o) in chunk.iter_mut().enumerate() {
            *o = k.row_dot_acts(w, r0 + i, cols, x, r0 + i + 1..rows);
        }
    });
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

/// The weights of one gated FFN for [`ffn_decode`]: `gate` and `up` are `n x d`, `down_t` is the
/// down projection transposed, `n x d`, so that every neuron owns one contiguous row of each.
#[derive(Clone, Copy)]
pub struct FfnRows<'a> {
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
/// are added in chunk order, so the result does not depend on thread scheduling. `k` is the
/// instruction-set path ([`kernels`] for the default).
#[allow(clippy::too_many_arguments)]
pub fn ffn_decode(
    k: &Kernels,
    w: FfnRows<'_>,
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
    with_acts(k, &[w.gate, w.up], &x[..d], |x| ffn_decode_acts(k, w, n, kept, x, act, partials, out))
}

#[allow(clippy::too_many_arguments)]
fn ffn_decode_acts(
    k: &Kernels,
    w: FfnRows<'_>,
    n: usize,
    kept: Option<&[u32]>,
    x: &Acts<'_>,
    act: impl Fn(f32) -> f32 + Sync,
    partials: &mut [f32],
    out: &mut [f32],
) {
    let d = w.d;
    let count = kept.map_or(n, <[u32]>::len);
    let neuron = |i: usize| kept.map_or(i, |k| k[i] as usize);
    // Skipped neurons break the sequential stream the hardware prefetcher follows: the kernels
    // prefetch on into the next kept neuron's rows. (Rows much shorter than PREFETCH_AHEAD still
    // stream poorly this way; the model decodes those from a compact copy, `model::ffn::KeptRows`.)
    let work = |range: std::ops::Range<usize>, acc: &mut [f32]| {
        acc.fill(0.0);
        if let (None, WeightSlice::Q(gq), WeightSlice::Q(uq)) = (kept, w.gate, w.up) {
            return ffn_rows_q(k, (gq, uq, w.down_t), (w.gate_bias, w.up_bias), d, range, x, &act, acc);
        }
        let end = range.end;
        for i in range {
            let j = neuron(i);
            let next = match kept {
                None => j + 1..n,
                Some(_) if i + 1 < end => neuron(i + 1)..neuron(i + 1) + 1,
                Some(_) => 0..0,
            };
            let g = k.row_dot_acts(w.gate, j, d, x, next.clone()) + w.gate_bias.map_or(0.0, |b| b[j]);
            let u = k.row_dot_acts(w.up, j, d, x, next.clone()) + w.up_bias.map_or(0.0, |b| b[j]);
            k.row_axpy(w.down_t, j, d, act(g) * u, acc, next);
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

/// Quantized gate and up rows `range` (consecutive: every neuron, or a compact copy of the kept
/// ones) into `acc += sum_j act(g_j) u_j down_t_j`: the gate and up products as multi-row
/// matrix-vector products over groups of neurons (sharing each activation block's loads), then
/// one `axpy` per neuron.
#[allow(clippy::too_many_arguments)]
fn ffn_rows_q(
    k: &Kernels,
    (gq, uq, down_t): (QSlice<'_>, QSlice<'_>, WeightSlice<'_>),
    (gb, ub): (Option<&[f32]>, Option<&[f32]>),
    d: usize,
    range: Range<usize>,
    x: &Acts<'_>,
    act: &(impl Fn(f32) -> f32 + Sync),
    acc: &mut [f32],
) {
    const GROUP: usize = 64;
    let (gbpr, ubpr) = (d / gq.qtype().block(), d / uq.qtype().block());
    let (ga, ua) = (x.q[gq.qtype().acts().index()], x.q[uq.qtype().acts().index()]);
    let (ga, ua) = (ga.expect("quantized activations"), ua.expect("quantized activations"));
    let (mut g, mut u) = ([0f32; GROUP], [0f32; GROUP]);
    for j0 in range.clone().step_by(GROUP) {
        let j1 = (j0 + GROUP).min(range.end);
        let (g, u) = (&mut g[..j1 - j0], &mut u[..j1 - j0]);
        // SAFETY: as in `Kernels::dot`; the rows lie inside the matrices, the activations were
        // quantized for their types.
        unsafe {
            (k.gemv_q)(gq.blocks(j0 * gbpr..j1 * gbpr), d, ga, g);
            (k.gemv_q)(uq.blocks(j0 * ubpr..j1 * ubpr), d, ua, u);
        }
        for (i, j) in (j0..j1).enumerate() {
            let gj = g[i] + gb.map_or(0.0, |b| b[j]);
            let uj = u[i] + ub.map_or(0.0, |b| b[j]);
            let next = if j + 1 < range.end { j + 1..j + 2 } else { 0..0 };
            k.row_axpy(down_t, j, d, act(gj) * uj, acc, next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paths this CPU runs; says which of the known ones it had to skip.
    pub(super) fn paths(test: &str) -> Vec<&'static Kernels> {
        let all = available();
        for name in PATHS {
            if !all.iter().any(|k| k.name == name) {
                eprintln!("{test}: skipped the {name} path: this CPU lacks its features");
            }
        }
        all
    }

    /// The activations as the path multiplies them: rounded to bf16 for bf16 rows on a native
    /// bf16 path (the reference then differs from the kernel only by f32 summation order).
    pub(super) fn acts_as_multiplied(k: &Kernels, w: WeightSlice<'_>, x: &[f32]) -> Vec<f32> {
        if k.native_bf16() && matches!(w, WeightSlice::BF16(_)) {
            x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
        } else {
            x.to_vec()
        }
    }

    #[test]
    fn rule_picks_avx512_on_intel_avx2_on_amd_and_vdpbf16ps_for_bf16_where_present() {
        let intel = Cpu { vendor: "GenuineIntel".into(), family: 6 };
        let zen4 = Cpu { vendor: "AuthenticAMD".into(), family: 0x19 };
        let other = Cpu { vendor: "HygonGenuine".into(), family: 0x18 };
        let pick = |c: &Cpu, have: &[&str]| DTYPES.map(|d| rule(c, have, d).0);
        let x512 = ["portable", "avx2", "avx512"];
        let bf = ["portable", "avx2", "avx512", "avx512bf16"];
        assert_eq!(pick(&intel, &x512), ["avx512"; 4]);
        assert_eq!(pick(&intel, &bf), ["avx512", "avx512bf16", "avx512", "avx512"]);
        assert_eq!(pick(&zen4, &x512), ["avx2"; 4]);
        assert_eq!(pick(&zen4, &bf), ["avx2", "avx512bf16", "avx2", "avx2"]);
        assert_eq!(pick(&zen4, &["portable", "avx2"]), ["avx2"; 4]);
        assert_eq!(pick(&other, &x512), ["avx2"; 4]);
        assert_eq!(pick(&intel, &["portable"]), ["portable"; 4]);
        // The chosen table has this CPU's paths, and forcing replaces them dtype by dtype.
        let chosen = chosen_paths();
        let have: Vec<&str> = available().iter().map(|k| k.name).collect();
        assert!(chosen.iter().all(|p| have.contains(p)), "{chosen:?} not in {have:?}");
        assert_eq!(forced("portable", chosen), ["portable"; 4]);
        assert_eq!(forced("bf16=portable", chosen), [chosen[0], "portable", chosen[2], chosen[3]]);
        assert_eq!(forced("no-such-path,f16=nope", chosen), chosen);
        let mixed = combine(["portable", chosen[1], "portable", chosen[3]]);
        assert_eq!(mixed.paths, ["portable", chosen[1], "portable", chosen[3]]);
    }

    fn reference(w: &[f32], cols: usize, x: &[f32]) -> Vec<f32> {
        w.chunks(cols).map(|r| r.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32).collect()
    }

    #[test]
    fn gemv_matches_reference_on_every_path_dtype_and_odd_size() {
        for k in paths("gemv") {
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
                    gemv_with(k, ws, cols, &x, &mut out);
                    let want = reference(&wf, cols, &acts_as_multiplied(k, ws, &x));
                    for (a, b) in out.iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{} {rows}x{cols}: {a} vs {b}", k.name);
                    }
                }
            }
        }
    }

    #[test]
    fn ffn_decode_matches_reference_dense_and_sparse_on_every_path_and_dtype() {
        let act = |v: f32| v / (1.0 + (-v).exp());
        for k in paths("ffn_decode") {
            for &(n, d) in &[(1, 3), (7, 5), (300, 33), (1000, 130)] {
                let mk = |seed: usize, len: usize| -> Vec<f32> {
                    (0..len).map(|i| (((i * 31 + seed * 17) % 97) as f32 - 48.0) / 40.0).collect()
                };
                let (g, u, dt, x) = (mk(1, n * d), mk(2, n * d), mk(3, n * d), mk(4, d));
                let kept: Vec<u32> = (0..n as u32).filter(|j| j % 3 != 1).collect();
                let b = |v: &[f32]| v.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
                let h = |v: &[f32]| v.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
                let (gb, ub, db) = (b(&g), b(&u), b(&dt));
                let (gh, uh, dh) = (h(&g), h(&u), h(&dt));
                let widen = |w: WeightSlice<'_>| -> Vec<f32> {
                    let mut v = vec![0f32; n * d];
                    for r in 0..n {
                        row_to_f32(w, r, d, &mut v[r * d..(r + 1) * d]);
                    }
                    v
                };
                let cases = [
                    (WeightSlice::F32(&g), WeightSlice::F32(&u), WeightSlice::F32(&dt)),
                    (WeightSlice::BF16(&gb), WeightSlice::BF16(&ub), WeightSlice::BF16(&db)),
                    (WeightSlice::F16(&gh), WeightSlice::F16(&uh), WeightSlice::F16(&dh)),
                ];
                for (wg, wu, wd) in cases {
                    // The reference uses the same (rounded) weights and activations, in f64.
                    let (g, u, dt) = (widen(wg), widen(wu), widen(wd));
                    let xr = acts_as_multiplied(k, wg, &x);
                    for sel in [None, Some(&kept[..])] {
                        let mut want = vec![0f64; d];
                        let idx: Vec<usize> = sel.map_or((0..n).collect(), |k| k.iter().map(|&j| j as usize).collect());
                        for &j in &idx {
                            let dotf = |w: &[f32]| -> f64 {
                                w[j * d..(j + 1) * d].iter().zip(&xr).map(|(a, b)| *a as f64 * *b as f64).sum()
                            };
                            let a = act(dotf(&g) as f32) as f64 * dotf(&u);
                            for i in 0..d {
                                want[i] += a * dt[j * d + i] as f64;
                            }
                        }
                        let w = FfnRows { gate: wg, up: wu, down_t: wd, gate_bias: None, up_bias: None, d };
                        let mut partials = vec![0f32; MAX_FFN_CHUNKS * d];
                        let mut out = vec![0f32; d];
                        ffn_decode(k, w, n, sel, &x, act, &mut partials, &mut out);
                        let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
                        for (o, w) in out.iter().zip(&want) {
                            assert!(((*o as f64) - w).abs() <= 1e-4 * scale, "{} n={n} d={d}: {o} vs {w}", k.name);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dot_axpy_and_sum_match_reference_on_every_path_dtype_and_size() {
        let all = paths("dot/axpy/sum");
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 577, 1000] {
            let w: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0).collect();
            let x: Vec<f32> = (0..n).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let slices = [WeightSlice::F32(&w), WeightSlice::BF16(&wb), WeightSlice::F16(&wh)];
            let want_sum: f64 = w.iter().map(|&a| a as f64).sum();
            for k in &all {
                let s = k.sum(&w) as f64;
                assert!((s - want_sum).abs() <= 1e-4 * (1.0 + want_sum.abs()), "{} sum n={n}: {s}", k.name);
                for ws in slices {
                    let mut wf = vec![0f32; n];
                    row_to_f32(ws, 0, n, &mut wf);
                    let want_dot: f64 = wf.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let tol = 1e-4 * (1.0 + wf.iter().zip(&x).map(|(a, b)| (a * b).abs() as f64).sum::<f64>());
                    let d = k.row_dot(ws, 0, n, &x, 0..0) as f64;
                    assert!((d - want_dot).abs() <= tol, "{} dot n={n}: {d} vs {want_dot}", k.name);
                    // With the activations as a matrix-vector product hands them (bf16 on a native path).
                    let xr = acts_as_multiplied(k, ws, &x);
                    let want_acts: f64 = wf.iter().zip(&xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let d = with_acts(k, &[ws], &x, |a| k.row_dot_acts(ws, 0, n, a, 0..0)) as f64;
                    assert!((d - want_acts).abs() <= tol, "{} acts dot n={n}: {d} vs {want_acts}", k.name);
                    let mut y = x.clone();
                    k.row_axpy(ws, 0, n, 0.5, &mut y, 0..0);
                    for ((a, xi), wi) in y.iter().zip(&x).zip(&wf) {
                        let b = *xi as f64 + 0.5 * *wi as f64;
                        assert!((*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()), "{} axpy n={n}", k.name);
                    }
                }
            }
        }
    }

    /// Deterministic values with a few outliers (as real activations and weights have).
    fn wavy(n: usize, seed: u64) -> Vec<f32> {
        let mut h = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|i| {
                h ^= h << 13;
                h ^= h >> 7;
                h ^= h << 17;
                let u = (h >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                (if i % 37 == 5 { 8.0 * u } else { u }) as f32
            })
            .collect()
    }

    /// How far an integer dot product of a row may be from the f64 dot product of the dequantized
    /// row with the unrounded activations: each activation is rounded to a multiple of its block's
    /// step `d = max|x| / 127` (at most `d / 2`, plus the f16 rounding of `d` times 127, < `0.07 d`),
    /// and Q8_1's `s = d sum(q)` is stored in f16 (relative 2^-10 with the sum's own rounding,
    /// times the weight block's minimum `m`, bounded here by the block's largest |w|).
    fn quantization_bound(q: QType, w: &[f32], x: &[f32]) -> f64 {
        let ab = match q.acts() {
            ActsType::Q8K => 256,
            _ => 32,
        };
        let mut bound = 0f64;
        for (wb, xb) in w.chunks(ab).zip(x.chunks(ab)) {
            let d = xb.iter().fold(0f64, |m, v| m.max(v.abs() as f64)) / 127.0;
            bound += 0.57 * d * wb.iter().map(|v| v.abs() as f64).sum::<f64>();
            if q.acts() == ActsType::Q8_1 {
                let s: f64 = xb.iter().map(|v| v.abs() as f64).sum();
                bound += wb.iter().fold(0f64, |m, v| m.max(v.abs() as f64)) * (s * 2f64.powi(-10) + d);
            }
        }
        bound + 1e-6
    }

    #[test]
    fn quantized_gemv_matches_dequantize_then_dot_on_every_path_type_and_odd_size() {
        use crate::quant::{dot_portable, QActs, QBlocks};
        for k in paths("quantized gemv") {
            for q in QType::ALL {
                let b = q.block();
                // Odd row counts and odd numbers of blocks per row (1, 3, 19 blocks of 32; 1 and 3 of 256).
                let shapes: &[(usize, usize)] =
                    if b == 32 { &[(1, 32), (7, 96), (33, 608), (12, 640)] } else { &[(3, 256), (9, 768)] };
                for &(rows, cols) in shapes {
                    let wf = wavy(rows * cols, 1 + rows as u64);
                    let x = wavy(cols, 7 + cols as u64);
                    let blocks = QBlocks::quantize(q, &wf, rows, cols).unwrap();
                    let mut deq = vec![0f32; rows * cols];
                    blocks.slice().dequantize(0, &mut deq);
                    // Our SIMD dequantization equals ggml's reference loop (candle's) exactly.
                    let mut fast = vec![f32::NAN; rows * cols];
                    dequantize(blocks.slice(), 0, &mut fast);
                    assert_eq!(fast, deq, "{} dequantize", q.name());
                    let mut out = vec![f32::NAN; rows];
                    gemv_with(k, WeightSlice::Q(blocks.slice()), cols, &x, &mut out);
                    let mut acts = QActs::new(q.acts());
                    acts.quantize(&x);
                    // The path's own quantizer gives the reference's blocks (ties aside: none here).
                    let mut fast = QActs::new(q.acts());
                    quantize_acts(k, &mut fast, &x);
                    assert_eq!(fast.bytes(), acts.bytes(), "{} {} activations", k.name, q.name());
                    let bpr = cols / b;
                    for r in 0..rows {
                        let wr = &deq[r * cols..(r + 1) * cols];
                        let exact: f64 = wr.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let bound = quantization_bound(q, wr, &x);
                        let got = out[r] as f64;
                        assert!(
                            (got - exact).abs() <= bound,
                            "{} {} {rows}x{cols} row {r}: {got} vs {exact} (bound {bound})",
                            k.name,
                            q.name()
                        );
                        // The same integers as ggml's reference loop: only f32 summation order differs.
                        let want = dot_portable(blocks.slice().blocks(r * bpr..(r + 1) * bpr), &acts) as f64;
                        let scale: f64 = wr.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + scale),
                            "{} {} row {r}: {got} vs reference loop {want}",
                            k.name,
                            q.name()
                        );
                    }
                    // The f32-activation scheme: the dequantized rows' dot products, up to f32
                    // summation order (no activation rounding).
                    let mut outf = vec![f32::NAN; rows];
                    gemv_float_acts_with(k, blocks.slice(), cols, &x, &mut outf);
                    for (r, got) in outf.iter().enumerate() {
                        let wr = &deq[r * cols..(r + 1) * cols];
                        let exact: f64 = wr.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let scale: f64 = wr.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                        assert!(
                            (*got as f64 - exact).abs() <= 2e-6 * (1.0 + scale),
                            "{} {} f32 activations row {r}: {got} vs {exact}",
                            k.name,
                            q.name()
                        );
                    }
                    // y += a * row, against the dequantized row.
                    let mut y = x.clone();
                    k.row_axpy(WeightSlice::Q(blocks.slice()), rows - 1, cols, 0.75, &mut y, 0..0);
                    for ((yi, xi), wi) in y.iter().zip(&x).zip(&deq[(rows - 1) * cols..]) {
                        let want = *xi as f64 + 0.75 * *wi as f64;
                        assert!((*yi as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{} {} axpy", k.name, q.name());
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_ffn_decode_matches_dequantized_reference_dense_and_sparse() {
        use crate::quant::QBlocks;
        let act = |v: f32| v / (1.0 + (-v).exp());
        for k in paths("quantized ffn_decode") {
            for (qg, qd) in [(QType::Q4_1, QType::Q8_0), (QType::Q5_0, QType::Q8_0), (QType::Q4K, QType::Q6K)] {
                let (n, d) = (45, 512);
                let (g, u, dt, x) = (wavy(n * d, 1), wavy(n * d, 2), wavy(n * d, 3), wavy(d, 4));
                let (gq, uq, dq) = (
                    QBlocks::quantize(qg, &g, n, d).unwrap(),
                    QBlocks::quantize(qg, &u, n, d).unwrap(),
                    QBlocks::quantize(qd, &dt, n, d).unwrap(),
                );
                let deq = |b: &QBlocks| {
                    let mut v = vec![0f32; n * d];
                    b.slice().dequantize(0, &mut v);
                    v
                };
                let (g, u, dt) = (deq(&gq), deq(&uq), deq(&dq));
                let kept: Vec<u32> = (0..n as u32).filter(|j| j % 3 != 1).collect();
                for sel in [None, Some(&kept[..])] {
                    let idx: Vec<usize> = sel.map_or((0..n).collect(), |k| k.iter().map(|&j| j as usize).collect());
                    let (mut want, mut bound) = (vec![0f64; d], 0f64);
                    for &j in &idx {
                        let row = |w: &[f32]| -> f64 {
                            w[j * d..(j + 1) * d].iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum()
                        };
                        let (gj, uj) = (row(&g), row(&u));
                        let a = act(gj as f32) as f64 * uj;
                        // The gate and up products' quantization error, through act(g) * u (act' <= 1.1).
                        let (eg, eu) = (
                            quantization_bound(qg, &g[j * d..(j + 1) * d], &x),
                            quantization_bound(qg, &u[j * d..(j + 1) * d], &x),
                        );
                        let da = 1.1 * eg * (uj.abs() + eu) + (act(gj as f32) as f64).abs() * eu + eg * eu;
                        let dmax = dt[j * d..(j + 1) * d].iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                        bound += da * dmax;
                        for i in 0..d {
                            want[i] += a * dt[j * d + i] as f64;
                        }
                    }
                    let w = FfnRows {
                        gate: WeightSlice::Q(gq.slice()),
                        up: WeightSlice::Q(uq.slice()),
                        down_t: WeightSlice::Q(dq.slice()),
                        gate_bias: None,
                        up_bias: None,
                        d,
                    };
                    let mut partials = vec![0f32; MAX_FFN_CHUNKS * d];
                    let mut out = vec![0f32; d];
                    ffn_decode(k, w, n, sel, &x, act, &mut partials, &mut out);
                    for (o, w) in out.iter().zip(&want) {
                        assert!(
                            ((*o as f64) - w).abs() <= bound + 1e-4,
                            "{} {}/{}: {o} vs {w} (bound {bound})",
                            k.name,
                            qg.name(),
                            qd.name()
                        );
                    }
                }
            }
        }
    }
}
