"""The memory-update op: eq 8 (linear) or eq 9 (delta) of one layer, fused with sigma.

    contract.py       name, namespace, version, attributes, inputs/outputs
    onnx_function.py  the reference decomposition as an ONNX model-local function
    reference.py      the CPU reference (the project's pure math)
    triton_kernel.py  the fused Triton kernel
    tensorrt_plugin.py  the TensorRT Python (QDP) plugin registration
"""
