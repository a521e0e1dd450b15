//! The key/value cache: one preallocated buffer per layer, `capacity x kv_dim` each, written in place
//! by the attention.

use crate::error::Result;
use crate::kernels::{Backend, Buf};

pub struct KvCache {
    k: Vec<Buf>,
    v: Vec<Buf>,
    capacity: usize,
}

impl KvCache {
    pub fn new(be: &dyn Backend, num_layers: usize, kv_dim: usize, capacity: usize) -> Result<Self> {
        let bufs = || (0..num_layers).map(|_| be.zeros(capacity * kv_dim)).collect::<Result<Vec<_>>>();
        Ok(Self { k: bufs()?, v: bufs()?, capacity })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A layer's cached keys and values (`capacity x kv_dim`; only written positions are meaningful).
    pub fn layer_mut(&mut self, layer: usize) -> (&mut Buf, &mut Buf) {
        (&mut self.k[layer], &mut self.v[layer])
    }
}
