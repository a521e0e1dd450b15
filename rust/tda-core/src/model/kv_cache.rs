//! The key/value cache: one preallocated buffer per layer, `capacity x kv_dim` each, written in place.

pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    kv_dim: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_dim: usize, capacity: usize) -> Self {
        Self {
            k: (0..num_layers).map(|_| vec![0.0; capacity * kv_dim]).collect(),
            v: (0..num_layers).map(|_| vec![0.0; capacity * kv_dim]).collect(),
            kv_dim,
            capacity,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Stores the keys and values of `rows` consecutive tokens starting at position `start`.
    pub fn write(&mut self, layer: usize, start: usize, k: &[f32], v: &[f32]) {
        let span = start * self.kv_dim..start * self.kv_dim + k.len();
        self.k[layer][span.clone()].copy_from_slice(k);
        self.v[layer][span].copy_from_slice(v);
    }

    /// All cached keys and values of a layer (`capacity x kv_dim`; only written positions are meaningful).
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }
}
