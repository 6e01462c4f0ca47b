"""The harness behind ``edgeadapt bench``: our engines beside PEFT, llama.cpp and onnxruntime(-genai).
Host-side; nothing on the device imports it."""
