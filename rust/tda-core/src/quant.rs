//! Block-quantized weights, kept in the blocks GGUF stores them in (llama.cpp's formats).
//!
//! A quantized matrix is `rows x cols` with every row a whole number of blocks: block `b` of row `r`
//! holds elements `b * B .. (b + 1) * B` of that row (`B` = 32 for Q4_0..Q8_0, 256 for the
//! K-quants) with its own scale (and minimum). The block layouts, the reference quantizers and
//! dequantizers and the portable dot products are `candle-core`'s port of ggml's
//! (`candle_core::quantized::k_quants`); the SIMD dot products the decode kernels use are in
//! `kernels::cpu`.
//!
//! A dot product of a quantized row with f32 activations first quantizes the activations to 8 bits
//! per block ([`QType::acts`]: Q8_0, Q8_1 or Q8_K, as ggml does), once per product, and then
//! multiplies integers. That rounding (at most half a step of `max|x| / 127` per block of 32 or
//! 256 activations) is the only difference from a dequantize-then-dot product in f32.

use crate::error::{Error, Result};
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, BlockQ8_0,
    BlockQ8_1, GgmlType,
};
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

/// A block format of weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// The 8-bit block format a weight type's dot products take their activations in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActsType {
    /// 32 values, one f16 scale.
    Q8_0,
    /// 32 values, an f16 scale and `scale * sum` (for types with a minimum).
    Q8_1,
    /// 256 values, an f32 scale and 16 sums of 16 values (the K-quants).
    Q8K,
}

impl QType {
    pub const ALL: [QType; 10] = [
        QType::Q4_0,
        QType::Q4_1,
        QType::Q5_0,
        QType::Q5_1,
        QType::Q8_0,
        QType::Q2K,
        QType::Q3K,
        QType::Q4K,
        QType::Q5K,
        QType::Q6K,
    ];

    /// `q4_0`, `q4_k`, ... (llama.cpp's names, lower case).
    pub fn name(self) -> &'static str {
        match self {
            QType::Q4_0 => "q4_0",
            QType::Q4_1 => "q4_1",
            QType::Q5_0 => "q5_0",
            QType::Q5_1 => "q5_1",
            QType::Q8_0 => "q8_0",
            QType::Q2K => "q2_k",
            QType::Q3K => "q3_k",
            QType::Q4K => "q4_k",
            QType::Q5K => "q5_k",
            QType::Q6K => "q6_k",
        }
    }

    /// The type named `s` (case-insensitive; `q4_k` or `q4k`).
    pub fn parse(s: &str) -> Option<QType> {
        let s = s.to_ascii_lowercase().replace('_', "");
        QType::ALL.into_iter().find(|q| q.name().replace('_', "") == s)
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            QType::Q4_0 => GgmlDType::Q4_0,
            QType::Q4_1 => GgmlDType::Q4_1,
            QType::Q5_0 => GgmlDType::Q5_0,
            QType::Q5_1 => GgmlDType::Q5_1,
            QType::Q8_0 => GgmlDType::Q8_0,
            QType::Q2K => GgmlDType::Q2K,
            QType::Q3K => GgmlDType::Q3K,
            QType::Q4K => GgmlDType::Q4K,
            QType::Q5K => GgmlDType::Q5K,
            QType::Q6K => GgmlDType::Q6K,
        }
    }

    /// The weight type of a GGUF tensor type; `None` for float types and activation-only types.
    pub fn from_ggml(t: GgmlDType) -> Option<QType> {
        QType::ALL.into_iter().find(|q| q.ggml() == t)
    }

    /// Elements per block.
    pub fn block(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.ggml().type_size()
    }

    /// Bytes of one row of `cols` elements.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block() * self.block_bytes()
    }

    /// Whether rows of `cols` elements can be stored (whole blocks).
    pub fn fits(self, cols: usize) -> bool {
        cols > 0 && cols.is_multiple_of(self.block())
    }

    pub fn acts(self) -> ActsType {
        match self {
            QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => ActsType::Q8_0,
            QType::Q4_1 | QType::Q5_1 => ActsType::Q8_1,
            _ => ActsType::Q8K,
        }
    }
}

/// Calls `$body` with `$v` bound to the typed blocks of a [`QBlocks`] (or [`QSlice`]) and `$t` to
/// the block type.
macro_rules! with_blocks {
    ($e:expr, $enum:ident, $v:ident, $t:ident => $body:expr) => {
        match $e {
            $enum::Q4_0($v) => {
                type $t = BlockQ4_0;
                $body
            }
            $enum::Q4_1($v) => {
                type $t = BlockQ4_1;
                $body
            }
            $enum::Q5_0($v) => {
                type $t = BlockQ5_0;
                $body
            }
            $enum::Q5_1($v) => {
                type $t = BlockQ5_1;
                $body
            }
            $enum::Q8_0($v) => {
                type $t = BlockQ8_0;
                $body
            }
            $enum::Q2K($v) => {
                type $t = BlockQ2K;
                $body
            }
            $enum::Q3K($v) => {
                type $t = BlockQ3K;
                $body
            }
            $enum::Q4K($v) => {
                type $t = BlockQ4K;
                $body
            }
            $enum::Q5K($v) => {
                type $t = BlockQ5K;
                $body
            }
            $enum::Q6K($v) => {
                type $t = BlockQ6K;
                $body
            }
        }
    };
}

/// The [`QBlocks`] variant of type `$q` holding `$make`, an expression generic in the block type
/// (inferred from the variant).
macro_rules! of_type {
    ($q:expr, $make:expr) => {
        match $q {
            QType::Q4_0 => QBlocks::Q4_0($make),
            QType::Q4_1 => QBlocks::Q4_1($make),
            QType::Q5_0 => QBlocks::Q5_0($make),
            QType::Q5_1 => QBlocks::Q5_1($make),
            QType::Q8_0 => QBlocks::Q8_0($make),
            QType::Q2K => QBlocks::Q2K($make),
            QType::Q3K => QBlocks::Q3K($make),
            QType::Q4K => QBlocks::Q4K($make),
            QType::Q5K => QBlocks::Q5K($make),
            QType::Q6K => QBlocks::Q6K($make),
        }
    };
}

/// The blocks of a quantized matrix, owned (in memory advised for huge pages).
pub enum QBlocks {
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q5_1(Vec<BlockQ5_1>),
    Q8_0(Vec<BlockQ8_0>),
    Q2K(Vec<BlockQ2K>),
    Q3K(Vec<BlockQ3K>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
}

/// Borrowed blocks of some rows of a quantized matrix.
#[derive(Clone, Copy)]
pub enum QSlice<'a> {
    Q4_0(&'a [BlockQ4_0]),
    Q4_1(&'a [BlockQ4_1]),
    Q5_0(&'a [BlockQ5_0]),
    Q5_1(&'a [BlockQ5_1]),
    Q8_0(&'a [BlockQ8_0]),
    Q2K(&'a [BlockQ2K]),
    Q3K(&'a [BlockQ3K]),
    Q4K(&'a [BlockQ4K]),
    Q5K(&'a [BlockQ5K]),
    Q6K(&'a [BlockQ6K]),
}

/// `len` blocks of `T`, copied from raw bytes (a GGUF tensor's data), in memory advised for huge pages.
fn blocks_from_bytes<T: GgmlType>(bytes: &[u8]) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    debug_assert!(bytes.len().is_multiple_of(size));
    let len = bytes.len() / size;
    let mut v: Vec<T> = crate::kernels::cpu::huge_page_vec(len);
    // SAFETY: the block types are `repr(C)` plain data (f16/f32 scales and integer arrays; every
    // bit pattern is a valid value), `v` has room for `len` blocks, and `bytes` holds exactly them.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, len * size);
        v.set_len(len);
    }
    v
}

/// `len` zeroed blocks of `T` (zero bits are a valid block: scale 0, all quants 0).
fn zeroed_blocks<T: GgmlType>(len: usize) -> Vec<T> {
    let mut v: Vec<T> = crate::kernels::cpu::huge_page_vec(len);
    // SAFETY: as in `blocks_from_bytes`: all-zero bytes are a valid block.
    unsafe {
        std::ptr::write_bytes(v.as_mut_ptr(), 0, len);
        v.set_len(len);
    }
    v
}

impl QBlocks {
    pub fn qtype(&self) -> QType {
        self.slice().qtype()
    }

    /// The blocks of a matrix of type `q` from its raw bytes (GGUF's layout).
    pub fn from_bytes(q: QType, bytes: &[u8]) -> QBlocks {
        of_type!(q, blocks_from_bytes(bytes))
    }

    /// `len` zero blocks of type `q`.
    pub fn zeros(q: QType, len: usize) -> QBlocks {
        of_type!(q, zeroed_blocks(len))
    }

    /// Quantizes a row-major `rows x cols` f32 matrix to `q` (ggml's reference quantizer), rows in
    /// parallel. `cols` must be a whole number of blocks.
    pub fn quantize(q: QType, data: &[f32], rows: usize, cols: usize) -> Result<QBlocks> {
        if !q.fits(cols) || data.len() != rows * cols {
            return Err(Error::model(format!(
                "cannot quantize a {rows} x {cols} matrix to {}: rows must be whole blocks of {}",
                q.name(),
                q.block()
            )));
        }
        let mut out = QBlocks::zeros(q, rows * cols / q.block());
        let bpr = cols / q.block();
        with_blocks!(&mut out, QBlocks, v, T => {
            v.par_chunks_mut(bpr).zip(data.par_chunks(cols)).for_each(|(b, x)| T::from_float(x, b));
        });
        Ok(out)
    }

    pub fn slice(&self) -> QSlice<'_> {
        match self {
            QBlocks::Q4_0(v) => QSlice::Q4_0(v),
            QBlocks::Q4_1(v) => QSlice::Q4_1(v),
            QBlocks::Q5_0(v) => QSlice::Q5_0(v),
            QBlocks::Q5_1(v) => QSlice::Q5_1(v),
            QBlocks::Q8_0(v) => QSlice::Q8_0(v),
            QBlocks::Q2K(v) => QSlice::Q2K(v),
            QBlocks::Q3K(v) => QSlice::Q3K(v),
            QBlocks::Q4K(v) => QSlice::Q4K(v),
            QBlocks::Q5K(v) => QSlice::Q5K(v),
            QBlocks::Q6K(v) => QSlice::Q6K(v),
        }
    }

    /// Replaces the contents with rows `rows` of `src` (rows of `cols` elements), in order; the
    /// buffer is reused when it has room and the type matches (no allocation per selection).
    pub fn gather(&mut self, src: QSlice<'_>, rows: &[u32], cols: usize) {
        let bpr = cols / src.qtype().block();
        if self.qtype() != src.qtype() || self.capacity() < rows.len() * bpr {
            *self = QBlocks::zeros(src.qtype(), rows.len() * bpr);
        }
        fn fill<T: Clone>(dst: &mut Vec<T>, src: &[T], rows: &[u32], bpr: usize) {
            dst.clear();
            for &r in rows {
                dst.extend_from_slice(&src[r as usize * bpr..(r as usize + 1) * bpr]);
            }
        }
        match (self, src) {
            (QBlocks::Q4_0(d), QSlice::Q4_0(s)) => fill(d, s, rows, bpr),
            (QBlocks::Q4_1(d), QSlice::Q4_1(s)) => fill(d, s, rows, bpr),
            (QBlocks::Q5_0(d), QSlice::Q5_0(s)) => fill(d, s, rows, bpr),
            (QBlocks::Q5_1(d), QSlice::Q5_1(s)) => fill(d, s, rows, bpr),
            (QBlocks::Q8_0(d), QSlice::Q8_0(s)) => fill(d, s, rows, bpr),
            (QBlocks::Q2K(d), QSlice::Q2K(s)) => fill(d, s, rows, bpr),
            (QBlocks::Q3K(d), QSlice::Q3K(s)) => fill(d, s, rows, bpr),
            (QBlocks::Q4K(d), QSlice::Q4K(s)) => fill(d, s, rows, bpr),
            (QBlocks::Q5K(d), QSlice::Q5K(s)) => fill(d, s, rows, bpr),
            (QBlocks::Q6K(d), QSlice::Q6K(s)) => fill(d, s, rows, bpr),
            _ => unreachable!("the buffer was made of the source's type above"),
        }
    }

    fn capacity(&self) -> usize {
        with_blocks!(self, QBlocks, v, _T => v.capacity())
    }
}

impl<'a> QSlice<'a> {
    pub fn qtype(&self) -> QType {
        match self {
            QSlice::Q4_0(_) => QType::Q4_0,
            QSlice::Q4_1(_) => QType::Q4_1,
            QSlice::Q5_0(_) => QType::Q5_0,
            QSlice::Q5_1(_) => QType::Q5_1,
            QSlice::Q8_0(_) => QType::Q8_0,
            QSlice::Q2K(_) => QType::Q2K,
            QSlice::Q3K(_) => QType::Q3K,
            QSlice::Q4K(_) => QType::Q4K,
            QSlice::Q5K(_) => QType::Q5K,
            QSlice::Q6K(_) => QType::Q6K,
        }
    }

    /// Blocks `range` (by block index).
    pub fn blocks(self, range: std::ops::Range<usize>) -> QSlice<'a> {
        match self {
            QSlice::Q4_0(v) => QSlice::Q4_0(&v[range]),
            QSlice::Q4_1(v) => QSlice::Q4_1(&v[range]),
            QSlice::Q5_0(v) => QSlice::Q5_0(&v[range]),
            QSlice::Q5_1(v) => QSlice::Q5_1(&v[range]),
            QSlice::Q8_0(v) => QSlice::Q8_0(&v[range]),
            QSlice::Q2K(v) => QSlice::Q2K(&v[range]),
            QSlice::Q3K(v) => QSlice::Q3K(&v[range]),
            QSlice::Q4K(v) => QSlice::Q4K(&v[range]),
            QSlice::Q5K(v) => QSlice::Q5K(&v[range]),
            QSlice::Q6K(v) => QSlice::Q6K(&v[range]),
        }
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        with_blocks!(self, QSlice, v, _T => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw bytes of the blocks.
    pub fn bytes(&self) -> &'a [u8] {
        with_blocks!(*self, QSlice, v, T => {
            // SAFETY: plain `repr(C)` data, read as bytes.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val::<[T]>(v)) }
        })
    }

    /// Elements `start..start + out.len()` (whole blocks) as f32.
    pub fn dequantize(&self, start: usize, out: &mut [f32]) {
        let b = self.qtype().block();
        debug_assert!(start.is_multiple_of(b) && out.len().is_multiple_of(b));
        with_blocks!(*self, QSlice, v, T => T::to_float(&v[start / b..(start + out.len()) / b], out))
    }
}

/// Activations quantized to 8 bits per block for one dot-product type ([`QType::acts`]).
pub enum QActs {
    Q8_0(Vec<BlockQ8_0>),
    Q8_1(Vec<BlockQ8_1>),
    Q8K(Vec<BlockQ8K>),
}

impl QActs {
    pub fn new(t: ActsType) -> QActs {
        match t {
            ActsType::Q8_0 => QActs::Q8_0(Vec::new()),
            ActsType::Q8_1 => QActs::Q8_1(Vec::new()),
            ActsType::Q8K => QActs::Q8K(Vec::new()),
        }
    }

    pub fn kind(&self) -> ActsType {
        match self {
            QActs::Q8_0(_) => ActsType::Q8_0,
            QActs::Q8_1(_) => ActsType::Q8_1,
            QActs::Q8K(_) => ActsType::Q8K,
        }
    }

    /// Room for `n` blocks (the buffer only grows), as raw bytes to write blocks into.
    pub fn blocks_mut(&mut self, n: usize) -> &mut [u8] {
        fn raw<T: GgmlType>(v: &mut Vec<T>, n: usize) -> &mut [u8] {
            if v.len() < n {
                *v = zeroed_blocks(n);
            }
            // SAFETY: plain `repr(C)` data; every bit pattern is a valid block.
            unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>()) }
        }
        match self {
            QActs::Q8_0(v) => raw(v, n),
            QActs::Q8_1(v) => raw(v, n),
            QActs::Q8K(v) => raw(v, n),
        }
    }

    /// Quantizes `x` (whole blocks) into this buffer, which only grows (ggml's reference loop).
    pub fn quantize(&mut self, x: &[f32]) {
        fn q<T: GgmlType>(v: &mut Vec<T>, x: &[f32]) {
            let n = x.len() / T::BLCK_SIZE;
            if v.len() < n {
                *v = zeroed_blocks(n);
            }
            T::from_float(x, &mut v[..n]);
        }
        match self {
            QActs::Q8_0(v) => q(v, x),
            QActs::Q8_1(v) => q(v, x),
            QActs::Q8K(v) => q(v, x),
        }
    }
}

/// The portable dot product of `blocks` (one row's worth) with activations quantized as their type
/// wants (ggml's reference loop, as candle ports it).
pub fn dot_portable(w: QSlice<'_>, acts: &QActs) -> f32 {
    fn go<T: GgmlType>(w: &[T], a: &[T::VecDotType]) -> f32 {
        T::vec_dot_unopt(w.len() * T::BLCK_SIZE, w, &a[..w.len()])
    }
    match (w, acts) {
        (QSlice::Q4_0(w), QActs::Q8_0(a)) => go(w, a),
        (QSlice::Q4_1(w), QActs::Q8_1(a)) => go(w, a),
        (QSlice::Q5_0(w), QActs::Q8_0(a)) => go(w, a),
        (QSlice::Q5_1(w), QActs::Q8_1(a)) => go(w, a),
        (QSlice::Q8_0(w), QActs::Q8_0(a)) => go(w, a),
        (QSlice::Q2K(w), QActs::Q8K(a)) => go(w, a),
        (QSlice::Q3K(w), QActs::Q8K(a)) => go(w, a),
        (QSlice::Q4K(w), QActs::Q8K(a)) => go(w, a),
        (QSlice::Q5K(w), QActs::Q8K(a)) => go(w, a),
        (QSlice::Q6K(w), QActs::Q8K(a)) => go(w, a),
        _ => panic!("activations quantized for another weight type"),
    }
}

/// The same with candle's SIMD loop where it has one (AVX2 for Q4_0, Q8_0 and the K-quants);
/// the portable loop otherwise.
pub fn dot_candle(w: QSlice<'_>, acts: &QActs) -> f32 {
    fn go<T: GgmlType>(w: &[T], a: &[T::VecDotType]) -> f32 {
        T::vec_dot(w.len() * T::BLCK_SIZE, w, &a[..w.len()])
    }
    match (w, acts) {
        (QSlice::Q4_0(w), QActs::Q8_0(a)) => go(w, a),
        (QSlice::Q4_1(w), QActs::Q8_1(a)) => go(w, a),
        (QSlice::Q5_0(w), QActs::Q8_0(a)) => go(w, a),
        (QSlice::Q5_1(w), QActs::Q8_1(a)) => go(w, a),
        (QSlice::Q8_0(w), QActs::Q8_0(a)) => go(w, a),
        (QSlice::Q2K(w), QActs::Q8K(a)) => go(w, a),
        (QSlice::Q3K(w), QActs::Q8K(a)) => go(w, a),
        (QSlice::Q4K(w), QActs::Q8K(a)) => go(w, a),
        (QSlice::Q5K(w), QActs::Q8K(a)) => go(w, a),
        (QSlice::Q6K(w), QActs::Q8K(a)) => go(w, a),
        _ => panic!("activations quantized for another weight type"),
    }
}

impl QActs {
    /// The raw bytes of the blocks.
    pub fn bytes(&self) -> &[u8] {
        fn raw<T>(v: &[T]) -> &[u8] {
            // SAFETY: plain `repr(C)` data, read as bytes.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        match self {
            QActs::Q8_0(v) => raw(v),
            QActs::Q8_1(v) => raw(v),
            QActs::Q8K(v) => raw(v),
        }
    }
}

impl ActsType {
    /// Index among the three types (`Q8_0`, `Q8_1`, `Q8K`).
    pub fn index(self) -> usize {
        self as usize
    }

    pub const ALL: [ActsType; 3] = [ActsType::Q8_0, ActsType::Q8_1, ActsType::Q8K];
}

impl QSlice<'_> {
    /// Elements `start..start + out.len()` as f32, from any element on: the blocks they touch are
    /// dequantized one at a time on the stack.
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        let b = self.qtype().block();
        let mut buf = [0f32; 256];
        let mut done = 0;
        while done < out.len() {
            let at = start + done;
            let (blk, off) = (at / b, at % b);
            let take = (b - off).min(out.len() - done);
            if off == 0 && take == b {
                self.blocks(blk..blk + 1).dequantize(0, &mut out[done..done + b]);
            } else {
                self.blocks(blk..blk + 1).dequantize(0, &mut buf[..b]);
                out[done..done + take].copy_from_slice(&buf[off..off + take]);
            }
            done += take;
        }
    }
}
