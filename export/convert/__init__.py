"""Importers of checkpoints trained elsewhere, one module per foreign format:

    lucidrains.py   infini-transformer-pytorch's InfiniTransformer (state_dict + its arguments)
    hf.py           Hugging Face Llama-family checkpoints (Llama, Mistral, Qwen2), new gates

Each maps the source's conventions onto `InfiniConfig` fields and its tensors onto our names,
refuses what it cannot honour in one sentence, and writes a native checkpoint.
"""
