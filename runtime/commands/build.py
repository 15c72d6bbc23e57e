"""`build`: TensorRT engines of an export directory."""
from __future__ import annotations

import click

from .options import OUTPUT_FILE


@click.command(short_help="Build TensorRT engines for an export.")
@click.argument("export_dir", metavar="OUT", type=click.Path())
@click.option("--engine", type=OUTPUT_FILE, default=None,
              help="Engine file of the segment graph (the decoding graphs' engines go beside "
                   "it) [default: OUT/engines/<backend>-sm<XY>-b<max batch>.engine].")
@click.option("--backend", type=click.Choice(["tensorrt", "tensorrt-rtx"]), default="tensorrt",
              help="tensorrt: the full TensorRT, on the GPU it builds for, with our "
                   "memory-update plugin; tensorrt-rtx: ahead of time for any compute "
                   "capability, no GPU needed (the memory update runs as its ONNX function).")
@click.option("--max-batch", default=8, type=click.IntRange(1),
              help="Largest batch the engines take.")
@click.option("--compute-capability", metavar="X.Y", default=None,
              help="GPU to build for (tensorrt-rtx) [default: this machine's GPU].")
@click.option("--no-plugin", is_flag=True,
              help="Let the memory update run as its ONNX function even where the plugin can.")
@click.option("--tf32", is_flag=True,
              help="Allow TF32 for fp32 matmuls (faster, ~1e-3 relative error; off by default).")
def build(export_dir: str, engine: str | None, backend: str, max_batch: int,
          compute_capability: str | None, no_plugin: bool, tf32: bool) -> None:
    """Build TensorRT engines for every graph of an export (segment, and the decoding graphs).

    Profiles come from the manifest's I/O table; precision from the ONNX dtypes (strongly
    typed). Engines are cached by the hashes of the ONNX files, the settings, TensorRT and the
    plugin; the manifest records what each engine was built for."""
    from infini_trt.runtime.engine import BuildSettings, build_engines

    settings = BuildSettings(backend=backend, max_batch=max_batch,
                             compute_capability=compute_capability, plugin=not no_plugin,
                             tf32=tf32)
    entry = build_engines(export_dir, settings, engine, log=click.echo)
    plugin = entry["plugin"]
    for name, graph in entry["graphs"].items():
        click.echo(f"{name}: {graph['file']} ({graph['bytes'] / 2**20:.1f} MiB, "
                   f"{graph['plugin_layers']} plugin layers"
                   f"{', from the engine cache' if graph['cached'] else ''})")
    click.echo(f"built for {entry['backend']} {entry['tensorrt']}, compute capability "
               f"{entry['compute_capability']}, batch <= {entry['max_batch']}; memory update: "
               f"{'plugin (' + plugin['implementation'] + ')' if plugin else 'ONNX function'}")


COMMANDS = [build]
