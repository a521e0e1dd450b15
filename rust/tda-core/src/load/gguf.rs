//! GGUF files: metadata, tensors, and the converter conventions undone.
