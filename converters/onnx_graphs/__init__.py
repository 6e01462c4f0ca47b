"""ONNX graph builders: every base graph (plain, fused, int4/int8, live slots, kinds, bottleneck, encoder)
written directly from the weights, and onnxruntime-genai's config."""
