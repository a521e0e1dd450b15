//! Per-token gated ("CATS") decode FFN: the gate decides, token by token, which neurons run.
//!
//! Over the candidate neurons (all `n`, or a static `kept` list) the kernel computes
//! `a_j = act(g_j . x + bg_j)`; neuron `j` passes when `|a_j| >= t`, and only passing neurons read
//! their `up` and `down_t` rows: `out = sum_{j passing} a_j (u_j . x + bu_j) down_t_j`. The bytes
//! read are the candidates' gate rows plus the passing neurons' up and down rows.
//!
//! Two passes per chunk of candidates, in one fork-join (no allocation per token):
//! 1. the chunk's gate rows (all neurons: consecutive rows, read as two interleaved runs, or the
//!    multi-row product for quantized rows; `kept`: the listed rows), then `act`, the threshold,
//!    and the chunk's passing neurons and their activations, compacted in preallocated scratch;
//! 2. the up row and the transposed down row of each passing neuron, the row loops prefetching
//!    on into the next passing neuron's rows; rows shorter than [`PREFETCH_AHEAD`] are prefetched
//!    whole, a few passing neurons ahead, by this module instead.
//!
//! Chunk partial sums are added in chunk order, as in [`super::ffn_decode`], so the result does
//! not depend on thread scheduling. (Measured against it on a 2-core Xeon: a second fork-join
//! over the whole passing list cut evenly, and gate blocks pipelined with the up/down rows of the
//! previous block, were no faster.)

use super::{with_acts, Acts, FfnRows, Kernels, WeightSlice, MAX_FFN_CHUNKS, MIN_PARALLEL_WORK, PREFETCH_AHEAD};
use rayon::prelude::*;
use std::ops::Range;

/// Reusable buffers of the gated kernel (grown once, never per token).
#[derive(Default)]
pub struct GatedScratch {
    /// Per candidate: the gate product, then (compacted to the front of each chunk's span) the
    /// activations of the chunk's passing neurons.
    acts: Vec<f32>,
    /// The passing neurons: each chunk's list at the start of its span, then all of them compacted
    /// to the front.
    pass: Vec<u32>,
    /// How many neurons passed in the last call.
    passed: usize,
}

impl GatedScratch {
    /// Scratch for up to `candidates` neurons (it grows on demand otherwise).
    pub fn with_capacity(candidates: usize) -> Self {
        let mut s = Self::default();
        s.reserve(candidates);
        s
    }

    /// The neurons that passed in the last call (indices into `0..n`, ascending).
    pub fn passing(&self) -> &[u32] {
        &self.pass[..self.passed]
    }

    fn reserve(&mut self, candidates: usize) {
        if self.acts.len() < candidates {
            self.acts.resize(candidates, 0.0);
            self.pass.resize(candidates, 0);
        }
    }
}

/// One row through a per-token gated FFN. Returns how many neurons passed. After the call,
/// `scratch.passing()` returns the passing neuron indices (indices into 0..n, ascending), for tests
/// and counting.
///
/// The candidates are all `n` neurons (`kept == None`) or the ascending list `kept`; neuron `j`
/// passes when `|act(g_j . x + bg_j)| >= t` (`t >= 0`; `t == 0` passes every neuron whose
/// activation is not NaN). `partials` holds `MAX_FFN_CHUNKS * d` floats as for
/// [`super::ffn_decode`]; `out` gets `d` values (zero when nothing passes).
#[allow(clippy::too_many_arguments)]
pub fn ffn_decode_gated(
    k: &Kernels,
    w: FfnRows<'_>,
    n: usize,
    kept: Option<&[u32]>,
    t: f32,
    x: &[f32],
    act: impl Fn(f32) -> f32 + Sync,
    scratch: &mut GatedScratch,
    partials: &mut [f32],
    out: &mut [f32],
) -> usize {
    let d = w.d;
    let count = kept.map_or(n, <[u32]>::len);
    out[..d].fill(0.0);
    scratch.passed = 0;
    if count == 0 {
        return 0;
    }
    scratch.reserve(count);
    let passed =
        with_acts(k, &[w.gate, w.up], &x[..d], |x| gated_acts(k, w, kept, count, t, x, &act, scratch, partials, out));
    scratch.passed = passed;
    passed
}

#[allow(clippy::too_many_arguments)]
fn gated_acts(
    k: &Kernels,
    w: FfnRows<'_>,
    kept: Option<&[u32]>,
    count: usize,
    t: f32,
    x: &Acts<'_>,
    act: &(impl Fn(f32) -> f32 + Sync),
    scratch: &mut GatedScratch,
    partials: &mut [f32],
    out: &mut [f32],
) -> usize {
    let d = w.d;
    // As `ffn_decode`: each candidate costs up to 3 rows of d multiply-adds.
    let per_chunk = (MIN_PARALLEL_WORK / (3 * d).max(1)).max(1);
    let most = partials.len().checked_div(d).map_or(1, |c| MAX_FFN_CHUNKS.min(c).max(1));
    let size = count.div_ceil(count.div_ceil(per_chunk).clamp(1, most));
    let chunks = count.div_ceil(size);
    let (acts, pass) = (&mut scratch.acts[..count], &mut scratch.pass[..count]);
    let mut counts = [0usize; MAX_FFN_CHUNKS];
    if chunks == 1 {
        return chunk(k, w, kept, t, x, act, 0..count, acts, pass, &mut out[..d]);
    }
    partials[..chunks * d]
        .par_chunks_mut(d)
        .zip(acts.par_chunks_mut(size))
        .zip(pass.par_chunks_mut(size))
        .zip(counts[..chunks].par_iter_mut())
        .enumerate()
        .for_each(|(c, (((acc, a), p), m))| {
            let start = c * size;
            *m = chunk(k, w, kept, t, x, act, start..start + a.len(), a, p, acc);
        });
    for (acc, _) in partials[..chunks * d].chunks(d).zip(&counts).filter(|(_, m)| **m > 0) {
        for (o, p) in out[..d].iter_mut().zip(acc) {
            *o += p;
        }
    }
    // Each chunk's passing list to the front, in chunk order (ascending neurons).
    let mut total = 0;
    for (c, &m) in counts[..chunks].iter().enumerate() {
        pass.copy_within(c * size..c * size + m, total);
        total += m;
    }
    total
}

/// The candidates `range` (positions in `kept`, or neurons): their gate rows into `acts`, the
/// passing ones into `pass` (neurons) and `acts` (their activations), then the passing neurons' up
/// and down rows into `acc` (zeroed first, and left alone when none passes). Returns how many passed.
#[allow(clippy::too_many_arguments)]
fn chunk(
    k: &Kernels,
    w: FfnRows<'_>,
    kept: Option<&[u32]>,
    t: f32,
    x: &Acts<'_>,
    act: &(impl Fn(f32) -> f32 + Sync),
    range: Range<usize>,
    acts: &mut [f32],
    pass: &mut [u32],
    acc: &mut [f32],
) -> usize {
    gates(k, w, kept, range.clone(), x, acts);
    let m = select(w, kept, t, act, range, acts, pass);
    if m > 0 {
        acc.fill(0.0);
        up_down(k, w, x, &pass[..m], &acts[..m], acc);
    }
    m
}

/// Rows shorter than this are prefetched whole, a few neurons ahead, by this module: the row
/// loops' own prefetch (`PREFETCH_AHEAD` bytes on into the next row) would reach only part of the
/// next row.
fn short(row_bytes: usize) -> bool {
    row_bytes < PREFETCH_AHEAD
}

/// How many rows of `row_bytes` to prefetch ahead: `2 * PREFETCH_AHEAD` bytes.
fn rows_ahead(row_bytes: usize) -> usize {
    (2 * PREFETCH_AHEAD).div_ceil(row_bytes.max(1))
}

/// The gate products `g_j . x` (no bias) of the candidates `range` into `out`.
fn gates(k: &Kernels, w: FfnRows<'_>, kept: Option<&[u32]>, range: Range<usize>, x: &Acts<'_>, out: &mut [f32]) {
    let d = w.d;
    let (start, end) = (range.start, range.end);
    match (kept, w.gate) {
        (None, WeightSlice::Q(q)) => {
            // Consecutive quantized rows: the multi-row product (sharing each activation block's loads).
            let bpr = d / q.qtype().block();
            let qa = x.q[q.qtype().acts().index()].expect("activations quantized for the gate's type");
            // SAFETY: as in `Kernels::dot`; the rows lie inside the matrix, the activations were
            // quantized for its type.
            unsafe { (k.gemv_q)(q.blocks(start * bpr..end * bpr), d, qa, out) };
        }
        (None, _) => {
            // Consecutive rows, read as two interleaved runs: one sequential stream alone leaves
            // the hardware prefetcher too few lines in flight.
            let half = (end - start).div_ceil(2);
            for p in 0..half {
                let (i, j) = (start + p, start + half + p);
                out[p] = k.row_dot_acts(w.gate, i, d, x, i + 1..start + half);
                if j < end {
                    out[half + p] = k.row_dot_acts(w.gate, j, d, x, j + 1..end);
                }
            }
        }
        (Some(kept), _) => {
            let rb = w.gate.row_bytes(d);
            let ahead = if short(rb) { rows_ahead(rb) } else { 0 };
            for &j in &kept[start..(start + ahead).min(end)] {
                prefetch(w.gate, j as usize, d, 0..rb);
            }
            for (i, o) in range.clone().zip(out.iter_mut()) {
                let next = if ahead > 0 {
                    if i + ahead < end {
                        prefetch(w.gate, kept[i + ahead] as usize, d, 0..rb);
                    }
                    0..0
                } else if i + 1 < end {
                    kept[i + 1] as usize..kept[i + 1] as usize + 1
                } else {
                    0..0
                };
                *o = k.row_dot_acts(w.gate, kept[i] as usize, d, x, next);
            }
        }
    }
}

/// `acts` (the gate products of the candidates `range`) through the bias and `act`; the passing
/// neurons to the front of `pass`, their activations to the front of `acts`. Returns how many passed.
fn select(
    w: FfnRows<'_>,
    kept: Option<&[u32]>,
    t: f32,
    act: &impl Fn(f32) -> f32,
    range: Range<usize>,
    acts: &mut [f32],
    pass: &mut [u32],
) -> usize {
    let mut m = 0;
    for (p, i) in range.enumerate() {
        let j = kept.map_or(i, |k| k[i] as usize);
        let a = act(acts[p] + w.gate_bias.map_or(0.0, |b| b[j]));
        // Slot m <= p: already read. Written always, kept when it passes (no branch).
        acts[m] = a;
        pass[m] = j as u32;
        m += (a.abs() >= t) as usize;
    }
    m
}

/// `acc += a_j (u_j . x + bu_j) down_t_j` over the neurons `pass` with activations `acts`.
fn up_down(k: &Kernels, w: FfnRows<'_>, x: &Acts<'_>, pass: &[u32], acts: &[f32], acc: &mut [f32]) {
    let d = w.d;
    let (ub, db) = (w.up.row_bytes(d), w.down_t.row_bytes(d));
    let ahead = if short(ub) || short(db) { rows_ahead(ub + db) } else { 0 };
    let fetch = |j: u32| {
        prefetch(w.up, j as usize, d, 0..ub);
        prefetch(w.down_t, j as usize, d, 0..db);
    };
    pass.iter().take(ahead).for_each(|&j| fetch(j));
    for (q, (&j, &a)) in pass.iter().zip(acts).enumerate() {
        let j = j as usize;
        let next = if ahead > 0 {
            if let Some(&f) = pass.get(q + ahead) {
                fetch(f);
            }
            0..0
        } else {
            pass.get(q + 1).map_or(0..0, |&f| f as usize..f as usize + 1)
        };
        let u = k.row_dot_acts(w.up, j, d, x, next.clone()) + w.up_bias.map_or(0.0, |b| b[j]);
        k.row_axpy(w.down_t, j, d, a * u, acc, next);
    }
}

/// The raw bytes of row `r` (of `cols` elements) of `w`.
fn row_span(w: WeightSlice<'_>, r: usize, cols: usize) -> &[u8] {
    fn bytes<T>(v: &[T]) -> &[u8] {
        // SAFETY: plain numbers, read as bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }
    match w {
        WeightSlice::F32(v) => bytes(&v[r * cols..(r + 1) * cols]),
        WeightSlice::BF16(v) => bytes(&v[r * cols..(r + 1) * cols]),
        WeightSlice::F16(v) => bytes(&v[r * cols..(r + 1) * cols]),
        WeightSlice::Q(q) => {
            let bpr = cols / q.qtype().block();
            q.blocks(r * bpr..(r + 1) * bpr).bytes()
        }
    }
}

/// Prefetches the cache lines of bytes `span` of row `r` of `w` (clipped to the row).
#[inline]
fn prefetch(w: WeightSlice<'_>, r: usize, cols: usize, span: Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let row = row_span(w, r, cols);
        let end = span.end.min(row.len());
        let mut off = span.start;
        while off < end {
            // SAFETY: SSE is part of x86-64; the address lies inside the row.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(off) as *const i8) };
            off += 64;
        }
        if end > span.start {
            // The last line, when the row does not start on a line.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(end - 1) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, r, cols, span);
}

#[cfg(test)]
mod tests {
    use super::super::tests::{acts_as_multiplied, paths};
    use super::super::{ffn_decode, row_to_f32};
    use super::*;
    use crate::quant::{ActsType, QActs, QBlocks, QType};
    use half::{bf16, f16};

    /// Deterministic values in (-0.5, 0.5) with a few outliers.
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

    /// `x` as the dot products of weights of type `q` see it: quantized to 8 bits per block
    /// (ggml's reference quantizer), then dequantized.
    fn quantized_acts(q: QType, x: &[f32]) -> Vec<f32> {
        let mut a = QActs::new(q.acts());
        a.quantize(x);
        let mut out = vec![0f32; x.len()];
        match q.acts() {
            // Q8_0 activation blocks are Q8_0 weight blocks.
            ActsType::Q8_0 => QBlocks::from_bytes(QType::Q8_0, a.bytes()).slice().dequantize(0, &mut out),
            // Q8_K: an f32 scale, 256 i8 values, 16 i16 sums.
            ActsType::Q8K => {
                assert_eq!(a.bytes().len(), x.len() / 256 * 292, "Q8_K block layout");
                for (b, o) in a.bytes().chunks(292).zip(out.chunks_mut(256)) {
                    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    for (v, &q) in o.iter_mut().zip(&b[4..260]) {
                        *v = d * q as i8 as f32;
                    }
                }
            }
            ActsType::Q8_1 => unimplemented!("the tests take weight types with Q8_0 or Q8_K activations"),
        }
        out
    }

    type Act = fn(f32) -> f32;
    const SILU: Act = |v| v / (1.0 + (-v).exp());
    /// Symmetric: large negative gates pass as large positive ones do (catches a missing `abs`).
    const IDENTITY: Act = |v| v;
    /// Exact zeros for every negative gate: `t == 0` must still pass them.
    const RELU: Act = |v| v.max(0.0);

    /// An FFN's weights widened to f32 (as the kernel sees them), `n x d` each, with the activations
    /// each matrix is multiplied with, and a bound on the error of each gate and up product.
    struct Reference {
        n: usize,
        d: usize,
        g: Vec<f32>,
        u: Vec<f32>,
        dt: Vec<f32>,
        xg: Vec<f32>,
        xu: Vec<f32>,
        gb: Option<Vec<f32>>,
        ub: Option<Vec<f32>>,
        /// Per neuron: bound on |kernel g_j - reference g_j| and the same for u_j (f32 summation).
        err: Vec<(f64, f64)>,
    }

    impl Reference {
        #[allow(clippy::too_many_arguments)]
        fn new(
            n: usize,
            d: usize,
            (g, u, dt): (Vec<f32>, Vec<f32>, Vec<f32>),
            (xg, xu): (Vec<f32>, Vec<f32>),
            gb: Option<Vec<f32>>,
            ub: Option<Vec<f32>>,
        ) -> Self {
            let abs = |w: &[f32], x: &[f32], j: usize| -> f64 {
                w[j * d..(j + 1) * d].iter().zip(x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum()
            };
            let err = (0..n).map(|j| (2e-5 * (1.0 + abs(&g, &xg, j)), 2e-5 * (1.0 + abs(&u, &xu, j)))).collect();
            Self { n, d, g, u, dt, xg, xu, gb, ub, err }
        }

        fn dot(w: &[f32], x: &[f32], j: usize, d: usize) -> f64 {
            w[j * d..(j + 1) * d].iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum()
        }
        fn gate(&self, j: usize) -> f64 {
            Self::dot(&self.g, &self.xg, j, self.d) + self.gb.as_ref().map_or(0.0, |b| b[j] as f64)
        }
        fn up(&self, j: usize) -> f64 {
            Self::dot(&self.u, &self.xu, j, self.d) + self.ub.as_ref().map_or(0.0, |b| b[j] as f64)
        }
        /// |act(g_j)| in f64 terms (act evaluated in f32 on the f64 gate, as the existing tests do).
        fn act(&self, act: Act, j: usize) -> f64 {
            act(self.gate(j) as f32) as f64
        }
        /// How far the kernel's |a_j| may be from the reference's: |act| over the gate's error
        /// interval (sampled: act is smooth), plus the rounding of act in f32.
        fn act_margin(&self, act: Act, j: usize) -> f64 {
            let (g, e, a) = (self.gate(j), self.err[j].0, self.act(act, j).abs());
            let spread = [-1.0, -0.5, 0.5, 1.0]
                .iter()
                .map(|s| ((act((g + s * e) as f32) as f64).abs() - a).abs())
                .fold(0f64, f64::max);
            spread + 1e-6 * (1.0 + a)
        }
        /// A threshold near the `keep` quantile of the candidates' |a|, in the widest gap among
        /// the nearby sorted values (so that few or no neurons sit within their margin of it).
        fn threshold(&self, act: Act, cands: &[usize], keep: f64) -> f32 {
            let mut v: Vec<f64> = cands.iter().map(|&j| self.act(act, j).abs()).collect();
            v.sort_by(f64::total_cmp);
            if v.len() < 2 {
                return (v[0] * 0.5) as f32;
            }
            let at = (((1.0 - keep) * v.len() as f64).round() as usize).clamp(1, v.len() - 1);
            let span = (v.len() / 20).max(1);
            let best = (at.saturating_sub(span).max(1)..(at + span).min(v.len() - 1) + 1)
                .max_by(|&a, &b| (v[a] - v[a - 1]).total_cmp(&(v[b] - v[b - 1])))
                .unwrap_or(at);
            (0.5 * (v[best] + v[best - 1])) as f32
        }
    }

    /// Runs the gated kernel and checks it against the reference: the passing set (exactly, away
    /// from the threshold's margin), and the output against the f64 sum over the neurons the
    /// kernel passed, within `tol(scale)` plus the products' error bounds.
    #[allow(clippy::too_many_arguments)]
    fn check(
        k: &Kernels,
        w: FfnRows<'_>,
        r: &Reference,
        kept: Option<&[u32]>,
        t: f32,
        x: &[f32],
        act: Act,
        scratch: &mut GatedScratch,
        what: &str,
    ) -> Vec<f32> {
        let (n, d) = (r.n, r.d);
        let mut partials = vec![f32::NAN; MAX_FFN_CHUNKS * d];
        let mut out = vec![f32::NAN; d];
        let passed = ffn_decode_gated(k, w, n, kept, t, x, act, scratch, &mut partials, &mut out);
        let got = scratch.passing().to_vec();
        assert_eq!(got.len(), passed, "{what}: count");
        assert!(got.windows(2).all(|p| p[0] < p[1]), "{what}: not ascending");
        let cands: Vec<usize> = kept.map_or((0..n).collect(), |k| k.iter().map(|&j| j as usize).collect());
        let mut in_got = vec![false; n];
        for &j in &got {
            assert!((j as usize) < n, "{what}: neuron {j} out of range");
            in_got[j as usize] = true;
        }
        // Nothing outside the candidates passes.
        if let Some(kept) = kept {
            assert!(got.iter().all(|j| kept.binary_search(j).is_ok()), "{what}: a neuron outside `kept` passed");
        }
        let mut ambiguous = 0;
        for &j in &cands {
            let a = r.act(act, j).abs();
            if t > 0.0 && (a - t as f64).abs() <= r.act_margin(act, j) {
                ambiguous += 1;
                continue;
            }
            assert_eq!(in_got[j], a >= t as f64, "{what}: neuron {j} |a| = {a} vs t = {t}");
        }
        assert!(ambiguous <= 2 + cands.len() / 50, "{what}: {ambiguous} neurons at the threshold");
        let (mut want, mut bound) = (vec![0f64; d], 0f64);
        for j in got.iter().map(|&j| j as usize) {
            let (g, u) = (r.gate(j), r.up(j));
            let a = act(g as f32) as f64;
            let (eg, eu) = r.err[j];
            let da = 1.1 * eg * (u.abs() + eu) + a.abs() * eu + eg * eu;
            bound += da * r.dt[j * d..(j + 1) * d].iter().fold(0f64, |m, v| m.max(v.abs() as f64));
            for (o, &v) in want.iter_mut().zip(&r.dt[j * d..(j + 1) * d]) {
                *o += a * u * v as f64;
            }
        }
        let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
        for (i, (o, w)) in out.iter().zip(&want).enumerate() {
            assert!(((*o as f64) - w).abs() <= 1e-4 * scale + bound, "{what}: out[{i}] {o} vs {w} (bound {bound})");
        }
        out
    }

    fn widen(w: WeightSlice<'_>, n: usize, d: usize) -> Vec<f32> {
        let mut v = vec![0f32; n * d];
        for r in 0..n {
            row_to_f32(w, r, d, &mut v[r * d..(r + 1) * d]);
        }
        v
    }

    /// The old kernel's output, for `t == 0`.
    fn dense(k: &Kernels, w: FfnRows<'_>, n: usize, kept: Option<&[u32]>, x: &[f32], act: Act) -> Vec<f32> {
        let mut partials = vec![0f32; MAX_FFN_CHUNKS * w.d];
        let mut out = vec![0f32; w.d];
        ffn_decode(k, w, n, kept, x, act, &mut partials, &mut out);
        out
    }

    /// The checks shared by the float and quantized tests, on one set of weights.
    fn run_cases(k: &Kernels, w: FfnRows<'_>, r: &Reference, x: &[f32], name: &str, scratch: &mut GatedScratch) {
        let n = r.n;
        let kept: Vec<u32> = (0..n as u32).filter(|j| j % 3 != 1).collect();
        for (act, an) in [(SILU, "silu"), (IDENTITY, "identity"), (RELU, "relu")] {
            for sel in [None, Some(&kept[..])] {
                let cands: Vec<usize> = sel.map_or((0..n).collect(), |k| k.iter().map(|&j| j as usize).collect());
                let what = |s: &str| format!("{} {name} n={n} d={} {an} kept={} {s}", k.name, r.d, sel.is_some());
                for keep in [0.8, 0.5, 0.1] {
                    let t = r.threshold(act, &cands, keep);
                    check(k, w, r, sel, t, x, act, scratch, &what(&format!("keep {keep} t={t}")));
                    let passed = scratch.passing().len();
                    // A threshold in the body of the distribution gates some neurons and keeps others.
                    if cands.len() >= 20 && an != "relu" {
                        assert!(passed > 0 && passed < cands.len(), "{}: {passed} passed", what("keep"));
                    }
                }
                // t = 0: every neuron passes (exact zeros too), and the output is the old kernel's.
                let out = check(k, w, r, sel, 0.0, x, act, scratch, &what("t=0"));
                assert_eq!(scratch.passing().len(), cands.len(), "{}", what("t=0 count"));
                let want = dense(k, w, n, sel, x, act);
                let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                for (o, w) in out.iter().zip(&want) {
                    assert!((o - w).abs() <= 1e-4 * scale, "{}: {o} vs {w}", what("t=0 vs ffn_decode"));
                }
                // t = infinity: nothing passes, the output is zero.
                let out = check(k, w, r, sel, f32::INFINITY, x, act, scratch, &what("t=inf"));
                assert_eq!(scratch.passing().len(), 0, "{}", what("t=inf count"));
                assert!(out.iter().all(|&v| v == 0.0), "{}", what("t=inf out"));
            }
        }
    }

    #[test]
    fn gated_ffn_decode_matches_reference_on_every_path_dtype_and_odd_size() {
        let mut scratch = GatedScratch::default();
        for k in paths("ffn_decode_gated") {
            for &(n, d) in &[(1, 3), (7, 5), (300, 33), (1000, 130), (3001, 17), (64, 600)] {
                let (g, u, dt, x) = (wavy(n * d, 1), wavy(n * d, 2), wavy(n * d, 3), wavy(d, 4));
                let (gb, ub) = (wavy(n, 5), wavy(n, 6));
                let b = |v: &[f32]| v.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
                let h = |v: &[f32]| v.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
                let (gbf, ubf, dbf) = (b(&g), b(&u), b(&dt));
                let (ghf, uhf, dhf) = (h(&g), h(&u), h(&dt));
                let cases = [
                    ("f32", WeightSlice::F32(&g), WeightSlice::F32(&u), WeightSlice::F32(&dt)),
                    ("bf16", WeightSlice::BF16(&gbf), WeightSlice::BF16(&ubf), WeightSlice::BF16(&dbf)),
                    ("f16", WeightSlice::F16(&ghf), WeightSlice::F16(&uhf), WeightSlice::F16(&dhf)),
                ];
                for (name, wg, wu, wd) in cases {
                    for bias in [false, true] {
                        let r = Reference::new(
                            n,
                            d,
                            (widen(wg, n, d), widen(wu, n, d), widen(wd, n, d)),
                            (acts_as_multiplied(k, wg, &x), acts_as_multiplied(k, wu, &x)),
                            bias.then(|| gb.clone()),
                            bias.then(|| ub.clone()),
                        );
                        let w = FfnRows {
                            gate: wg,
                            up: wu,
                            down_t: wd,
                            gate_bias: r.gb.as_deref(),
                            up_bias: r.ub.as_deref(),
                            d,
                        };
                        run_cases(k, w, &r, &x, &format!("{name} bias={bias}"), &mut scratch);
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_gated_ffn_decode_matches_dequantized_reference() {
        let mut scratch = GatedScratch::default();
        for k in paths("quantized ffn_decode_gated") {
            for (qg, qd) in [
                (QType::Q8_0, QType::Q8_0),
                (QType::Q4_0, QType::Q8_0),
                (QType::Q5_0, QType::Q8_0),
                (QType::Q4K, QType::Q6K),
            ] {
                for &(n, d) in &[(45, 512), (700, 256), (33, 2048)] {
                    let (g, u, dt, x) = (wavy(n * d, 1), wavy(n * d, 2), wavy(n * d, 3), wavy(d, 4));
                    let (gq, uq, dq) = (
                        QBlocks::quantize(qg, &g, n, d).unwrap(),
                        QBlocks::quantize(qg, &u, n, d).unwrap(),
                        QBlocks::quantize(qd, &dt, n, d).unwrap(),
                    );
                    let (gs, us, ds) =
                        (WeightSlice::Q(gq.slice()), WeightSlice::Q(uq.slice()), WeightSlice::Q(dq.slice()));
                    // The kernel multiplies integers: exactly the dequantized rows with the
                    // dequantized 8-bit activations, up to f32 summation.
                    let xq = quantized_acts(qg, &x);
                    let r = Reference::new(
                        n,
                        d,
                        (widen(gs, n, d), widen(us, n, d), widen(ds, n, d)),
                        (xq.clone(), xq),
                        Some(wavy(n, 5)),
                        None,
                    );
                    let w = FfnRows { gate: gs, up: us, down_t: ds, gate_bias: r.gb.as_deref(), up_bias: None, d };
                    run_cases(k, w, &r, &x, &format!("{}/{}", qg.name(), qd.name()), &mut scratch);
                }
            }
        }
    }

    #[test]
    fn gated_scratch_is_reused_across_sizes_and_the_result_is_deterministic() {
        let k = super::super::kernels();
        let mut scratch = GatedScratch::default();
        let mut run = |n: usize, d: usize, t: f32| -> (Vec<f32>, Vec<u32>) {
            let (g, u, dt, x) = (wavy(n * d, 11), wavy(n * d, 12), wavy(n * d, 13), wavy(d, 14));
            let w = FfnRows {
                gate: WeightSlice::F32(&g),
                up: WeightSlice::F32(&u),
                down_t: WeightSlice::F32(&dt),
                gate_bias: None,
                up_bias: None,
                d,
            };
            let mut partials = vec![0f32; MAX_FFN_CHUNKS * d];
            let mut out = vec![0f32; d];
            ffn_decode_gated(k, w, n, None, t, &x, SILU, &mut scratch, &mut partials, &mut out);
            (out, scratch.passing().to_vec())
        };
        let big = run(5000, 64, 0.5);
        let small = run(10, 64, 0.5);
        assert!(small.1.len() <= 10 && small.1.iter().all(|&j| j < 10));
        assert_eq!(run(5000, 64, 0.5), big, "same inputs, same bits");
        assert_eq!(run(10, 64, 0.5), small);
    }
}
