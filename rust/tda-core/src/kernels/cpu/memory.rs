//! Where decode's weights live. Decoding streams every weight once per token; a sparse decode jumps
//! between the rows of kept neurons. With 4 KiB pages each jump is a new page and often a TLB miss,
//! so weights are copied once at load time into memory the kernel is asked to back with 2 MiB pages
//! (transparent huge pages, `madvise` mode on most Linux systems; elsewhere this is a plain copy).

/// An empty vector with room for `len` elements, in memory advised for huge pages.
pub fn huge_page_vec<T>(len: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    advise_huge_pages(v.as_mut_ptr() as *mut u8, len * std::mem::size_of::<T>());
    v
}

/// A copy of `src` in memory advised for huge pages.
pub fn huge_page_copy<T: Copy>(src: &[T]) -> Vec<T> {
    let mut v = huge_page_vec(src.len());
    v.extend_from_slice(src);
    v
}

/// Asks the kernel to back the 2 MiB-aligned part of `[ptr, ptr + bytes)` with huge pages.
fn advise_huge_pages(ptr: *mut u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).div_ceil(HUGE) * HUGE;
        let end = (ptr as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside the allocation; madvise only changes paging hints and its
            // failure (e.g. THP disabled) is harmless.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, bytes);
}

/// The same CPU tensor, its elements moved into memory advised for huge pages.
pub fn on_huge_pages(t: candle_core::Tensor) -> crate::error::Result<candle_core::Tensor> {
    use super::{with_weights, WeightSlice};
    use candle_core::{Device, Tensor};
    let shape = t.dims().to_vec();
    Ok(with_weights(&t, |w| match w {
        WeightSlice::F32(v) => Tensor::from_vec(huge_page_copy(v), shape, &Device::Cpu),
        WeightSlice::BF16(v) => Tensor::from_vec(huge_page_copy(v), shape, &Device::Cpu),
        WeightSlice::F16(v) => Tensor::from_vec(huge_page_copy(v), shape, &Device::Cpu),
        WeightSlice::Q(_) => unreachable!("a tensor holds no quantized blocks"),
    })??)
}

/// Weight rows owned in one of the weight dtypes: a compact copy of some rows of a matrix.
/// Its buffer only grows (on huge pages), so refilling it allocates nothing once it is big enough.
pub enum RowCopy {
    F32(Vec<f32>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
    Q(crate::quant::QBlocks),
}

impl Default for RowCopy {
    fn default() -> Self {
        RowCopy::F32(Vec::new())
    }
}

impl RowCopy {
    /// Replaces the contents with `rows` of `w` (a matrix with `cols` columns), in order.
    pub fn fill(&mut self, w: super::WeightSlice<'_>, rows: &[u32], cols: usize) {
        fn gather<T: Copy>(dst: &mut Vec<T>, src: &[T], rows: &[u32], cols: usize) {
            dst.clear();
            if dst.capacity() < rows.len() * cols {
                *dst = huge_page_vec(rows.len() * cols);
            }
            for &r in rows {
                dst.extend_from_slice(&src[r as usize * cols..(r as usize + 1) * cols]);
            }
        }
        use super::WeightSlice as W;
        match (&mut *self, w) {
            (RowCopy::F32(dst), W::F32(v)) => gather(dst, v, rows, cols),
            (RowCopy::BF16(dst), W::BF16(v)) => gather(dst, v, rows, cols),
            (RowCopy::F16(dst), W::F16(v)) => gather(dst, v, rows, cols),
            (RowCopy::Q(dst), W::Q(v)) => dst.gather(v, rows, cols),
            // First fill, or another dtype: start a buffer of the right type.
            (_, w) => {
                *self = match w {
                    W::F32(_) => RowCopy::F32(Vec::new()),
                    W::BF16(_) => RowCopy::BF16(Vec::new()),
                    W::F16(_) => RowCopy::F16(Vec::new()),
                    W::Q(q) => RowCopy::Q(crate::quant::QBlocks::zeros(q.qtype(), 0)),
                };
                self.fill(w, rows, cols)
            }
        }
    }

    /// The rows copied last.
    pub fn rows(&self) -> super::WeightSlice<'_> {
        use super::WeightSlice as W;
        match self {
            RowCopy::F32(v) => W::F32(v),
            RowCopy::BF16(v) => W::BF16(v),
            RowCopy::F16(v) => W::F16(v),
            RowCopy::Q(v) => W::Q(v.slice()),
        }
    }
}
