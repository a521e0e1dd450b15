//! Typed errors. The bindings map each kind to one Python exception type in one place.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory that should exist does not (Python: `FileNotFoundError`).
    #[error("{0}")]
    NotFound(String),
    /// A model file is corrupt, truncated, inconsistent or unsupported (Python: `ValueError`).
    #[error("{0}")]
    InvalidModel(String),
    /// A caller-supplied argument is out of range or malformed (Python: `ValueError`).
    #[error("{0}")]
    InvalidArgument(String),
    /// A device ran out of memory (Python: `MemoryError`); the engine stays usable.
    #[error("{0}")]
    OutOfMemory(String),
    /// The caller stopped the work (a progress function's error; Python: `KeyboardInterrupt`
    /// unless the callback raised something else, which is raised instead).
    #[error("{0}")]
    Cancelled(String),
    /// Something that should not happen; a bug rather than bad input (Python: `RuntimeError`).
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn model(msg: impl Into<String>) -> Self {
        Error::InvalidModel(msg.into())
    }
    pub fn arg(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    pub fn not_found(path: &Path, what: &str) -> Self {
        Error::NotFound(format!("{what} not found: {}", path.display()))
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Internal(e.to_string())
    }
}

/// Reads a whole text file, turning a missing file into `NotFound` and other failures into `InvalidModel`.
pub fn read_text(path: &Path, what: &str) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::not_found(path, what)),
        Err(e) => Err(Error::model(format!("cannot read {what} {}: {e}", path.display()))),
    }
}

/// Parses JSON text, naming the file in the error.
pub fn parse_json<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::model(format!("invalid JSON in {}: {e}", path.display())))
}
