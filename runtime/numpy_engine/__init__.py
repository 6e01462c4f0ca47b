"""The pure-numpy engine: model.gguf memory-mapped, its ops, lazy ggml weights and the decoder layers."""
