//! Tokenizer from GGUF metadata (`tokenizer.ggml.*`): rebuilt as a `tokenizer.json` document.

use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;

/// Builds the tokenizer described by a GGUF file's metadata.
pub fn from_gguf(metadata: &HashMap<String, Value>) -> Result<TextTokenizer> {
    let _ = metadata;
    Err(Error::model("GGUF tokenizers are not implemented yet"))
}
