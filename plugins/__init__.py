"""The custom memory-update op: contract, reference, Triton kernel, TensorRT registration."""
