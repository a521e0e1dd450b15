//! Recorded decode steps (CUDA graphs). A decode step is a few hundred small kernels; replaying
//! them as one graph removes the per-launch cost of the driver.
//!
//! For each key of a run state (`Backend::run_graph`): the first call runs the step plainly (it
//! sizes the kernels' scratch and warms everything up); the second records the step by stream
//! capture on a private stream of the backend, instantiates it and launches it on the main
//! stream; later calls only launch. A recording holds device addresses: of the run state's
//! buffers (the caller keeps graphs and buffers together) and of the backend's scratch, whose
//! growth makes the recordings of before stale (they are then recorded again). A step that cannot
//! be recorded (capture error) runs plainly from then on, for that key, until the scratch changes.
//! `TDA_ENGINE_CUDA_GRAPHS=0` turns recording off; `TDA_ENGINE_CUDA_DEBUG=1` says why a step was
//! not recorded.
//!
//! Capture runs on a private stream, so work that other threads queue meanwhile (uploads, frees,
//! argmax) goes to the main stream and never into the recording; the calling thread's kernels go
//! to the capture stream ([`CudaBackend::cur_stream`]).

use super::{driver_error, CudaBackend, RECORDING};
use crate::error::{Error, Result};
use crate::kernels::Graphs;
use cudarc::driver::{result, sys, CudaGraph};
use std::collections::HashMap;

enum Entry {
    /// Ran once, plainly.
    Seen,
    /// Recorded with the scratch of this generation.
    Ready { graph: CudaGraph, generation: u64 },
    /// Recording failed with the scratch of this generation; runs plainly (until the scratch
    /// changes, which may have been the reason).
    Failed { generation: u64 },
}

/// The recordings of one run state, by key.
#[derive(Default)]
pub(crate) struct GraphCache {
    entries: HashMap<u64, Entry>,
}

// SAFETY: a CudaGraph is a pair of driver handles that may be used from any thread as long as
// calls on it are serialised; the cache is only reached through `&mut` of its run state.
unsafe impl Send for GraphCache {}

/// Restores the thread's recording flag even if the step panics.
struct RecordingGuard;

impl Drop for RecordingGuard {
    fn drop(&mut self) {
        RECORDING.with(|r| r.set(0));
    }
}

/// Whether `graphs` holds a recording for `key` (for diagnostics).
pub(crate) fn recorded(graphs: &Graphs, key: u64) -> bool {
    graphs
        .as_ref()
        .and_then(|g| g.downcast_ref::<GraphCache>())
        .is_some_and(|c| matches!(c.entries.get(&key), Some(Entry::Ready { .. })))
}

impl CudaBackend {
    pub(crate) fn run_graph_impl(
        &self,
        graphs: &mut Graphs,
        key: u64,
        enqueue: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        if !self.use_graphs || self.recording() {
            return enqueue();
        }
        if !graphs.as_ref().is_some_and(|g| g.is::<GraphCache>()) {
            *graphs = Some(Box::new(GraphCache::default()));
        }
        let Some(cache) = graphs.as_mut().and_then(|g| g.downcast_mut::<GraphCache>()) else {
            return Err(Error::Internal("graph cache of another type".into()));
        };
        let generation = self.scratch_generation();
        match cache.entries.get(&key) {
            Some(Entry::Failed { generation: g }) if *g == generation => return enqueue(),
            None | Some(Entry::Failed { .. }) => {
                cache.entries.insert(key, Entry::Seen);
                return enqueue();
            }
            Some(Entry::Ready { graph, generation: g }) if *g == generation => {
                self.bind()?;
                // SAFETY: a live instantiated graph; launched on the main stream, in order.
                return unsafe { result::graph::launch(graph.cu_graph_exec(), self.stream.cu_stream()) }
                    .map_err(|e| driver_error(e, "launching a recorded step"));
            }
            Some(_) => {}
        }
        if let Some(Entry::Ready { graph, .. }) = cache.entries.remove(&key) {
            // A stale recording may still be running: wait before destroying it.
            self.stream.synchronize().map_err(|e| driver_error(e, "synchronising"))?;
            drop(graph);
        }
        match self.record(enqueue) {
            Ok(graph) => {
                self.bind()?;
                // SAFETY: as above.
                unsafe { result::graph::launch(graph.cu_graph_exec(), self.stream.cu_stream()) }
                    .map_err(|e| driver_error(e, "launching a recorded step"))?;
                cache.entries.insert(key, Entry::Ready { graph, generation });
                Ok(())
            }
            Err(why) => {
                if std::env::var_os("TDA_ENGINE_CUDA_DEBUG").is_some() {
                    eprintln!("tda-engine: cuda:{}: decode step {key} not recorded as a graph: {why}", self.ordinal);
                }
                cache.entries.insert(key, Entry::Failed { generation });
                enqueue()
            }
        }
    }

    /// Records `enqueue` on the capture stream; nothing runs.
    fn record(&self, enqueue: &mut dyn FnMut() -> Result<()>) -> std::result::Result<CudaGraph, String> {
        let _one = self.capture_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.bind().map_err(|e| e.to_string())?;
        let cs = &self.capture_stream;
        cs.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| format!("{e:?}"))?;
        let r = {
            RECORDING.with(|r| r.set(cs.cu_stream() as usize));
            let _guard = RecordingGuard;
            enqueue()
        };
        let g = cs.end_capture(sys::CUgraphInstantiate_flags(0));
        match (r, g) {
            (Ok(()), Ok(Some(graph))) => Ok(graph),
            (Ok(()), Ok(None)) => Err("the step queued nothing".into()),
            (Err(e), _) => Err(e.to_string()),
            (Ok(()), Err(e)) => Err(format!("{e:?}")),
        }
    }
}
