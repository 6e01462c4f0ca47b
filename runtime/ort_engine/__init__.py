"""The onnxruntime engine: the base folder's ONNX graphs (plain, slotted, quantized) in onnxruntime sessions."""
