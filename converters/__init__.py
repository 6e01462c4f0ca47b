"""Host-side converters: Hugging Face / GGUF bases and PEFT adapters into edgeadapt files.

These may import torch, transformers and onnx; the device runtime never imports them.
"""
