"""Option types shared by several commands."""
import click

DTYPE_CHOICE = click.Choice(["fp32", "fp16", "bf16"])
BACKEND_CHOICE = click.Choice(["torch", "onnxruntime", "tensorrt"])
DEVICE_CHOICE = click.Choice(["cpu", "cuda"])
