"""Device-side runtime: numpy + gguf, onnxruntime when present; never torch."""
