"""onnxruntime-genai as a peer of `bench`: a Hugging Face Llama of the model's shape, exported
with onnxruntime-genai's model builder (fused GroupQueryAttention, MatMulNBits for int4) and
run through its Generator, what a user running a Llama-family model on ONNX Runtime picks.

The peer model (`peer_source`):
    MODEL converted from Hugging Face   its source checkpoint, given by the user
                                        (`bench --peer-source HF_DIR`: a converted checkpoint
                                        does not record where it came from); its shape is
                                        checked against MODEL's
    otherwise                           a `LlamaForCausalLM` of MODEL's shape (vocabulary,
                                        width, layers, heads, K/V heads, head_dim, MLP width,
                                        RoPE theta, norm eps, tied embeddings) in Llama's own
                                        conventions, random weights from the seed, with
                                        max_position_embeddings covering the longest context
                                        measured (`context_positions`) and a word-level
                                        tokenizer of its vocabulary (the builder reads one)

Its export (`cached_genai`) is made once by the builder in a subprocess (its output to a log
file beside the cache entry) and kept in the export cache (`export_cache.cached`, kind "genai"), keyed
by the source (config and seed, or the source's files' hashes), the precision, the builder's
options and the versions of onnxruntime-genai, transformers and torch. Like every entry of that
cache it carries a manifest.json: the builder's files with their sha256 (a damaged entry is
made again), the graph's I/O read from model.onnx, the source and the tool versions. The
builder is told `prune_lm_head=true`: its prefill computes the last token's logits only, as
our prefill graph does (by default it computes the logits of every prompt token).

`GenaiRunner` puts the Generator behind the runner contract, so that `bench_measure` times it
as it times ours: at batch 1 a prompt goes through `append_tokens` in chunks of the segment
length (each chunk attends to the whole K/V cache before it), decoding appends one token at a
time. At batch > 1 the Generator takes `append_tokens` once only (a prompt in one call, whose
attention over the whole prompt at once grows quadratically in memory), so the peer is measured
at batch 1 only. Its K/V cache holds the whole context: it is allocated for `capacity` tokens
when a sequence starts (onnxruntime-genai shares the past and present buffers). It cannot hand
its state out, but it can keep a prompt's context and rewind to it (`keep`, `KeptContext`):
that is how it takes part in `bench_measure.interleaved`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from infini_trt.export.config import InfiniConfig
from infini_trt.export.errors import InfiniTrtError, InputError, MissingDependencyError
from infini_trt.export.manifest import package_version

from .runners.base import Runner

PRECISIONS = {"onnxruntime-genai": "float32", "onnxruntime-genai:int4": "int4"}
BUILDER_PRECISION = {"float32": "fp32", "int4": "int4"}
# prune_lm_head: the last token's logits only in prefill (ours too); hf_token=false: a local
# directory, no Hugging Face login looked up
BUILDER_OPTIONS = ("prune_lm_head=true", "hf_token=false")
INSTALL = 'pip install "infini-trt[peers]"'
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "ffn_dim", "rope_theta", "norm_eps", "tie_embeddings")
MIN_POSITIONS = 4096
BUILDER_LOG = "builder.log"


class BuilderError(InfiniTrtError):
    """onnxruntime-genai's model builder failed on a model this peer gave it."""


def require_genai():
    """The onnxruntime_genai module, or MissingDependencyError with how to install it."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise MissingDependencyError("onnxruntime-genai", "the onnxruntime-genai peer",
                                     INSTALL) from None
    return onnxruntime_genai


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("transformers", "the onnxruntime-genai peer",
                                     INSTALL) from None
    return transformers


def context_positions(tokens: int) -> int:
    """max_position_embeddings of a random peer that must hold `tokens` tokens: the next power
    of two, at least MIN_POSITIONS (so that other lengths reuse the cached export)."""
    return max(MIN_POSITIONS, 1 << max(tokens - 1, 1).bit_length())


# ------------------------------------------------------------------------------ the source
def llama_config(cfg: InfiniConfig, max_positions: int) -> dict:
    """The Hugging Face `config.json` fields of a Llama of `cfg`'s shape."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.ffn_dim, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": max_positions, "bos_token_id": 0,
            "eos_token_id": cfg.vocab_size - 1}


def word_level_tokenizer(vocab_size: int):
    """A `PreTrainedTokenizerFast` of `vocab_size` words t0 .. t{V-1} (the builder reads a
    tokenizer; the bench feeds token ids and never uses it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    transformers = _require_transformers()
    words = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="t0", eos_token=f"t{vocab_size - 1}",
        unk_token="t0")


def random_llama(cfg: InfiniConfig, seed: int, max_positions: int):
    """`LlamaForCausalLM` of `cfg`'s shape, float32, initialised by transformers from `seed`
    (the global torch RNG is left as it was)."""
    import torch

    transformers = _require_transformers()
    hf_config = transformers.LlamaConfig(**llama_config(cfg, max_positions))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(hf_config)
    return model.float().eval()


def write_random_llama(cfg: InfiniConfig, seed: int, max_positions: int, directory: Path) -> Path:
    """`random_llama` saved with save_pretrained (safetensors) and its tokenizer -> directory
    (without transformers' progress bars)."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        random_llama(cfg, seed, max_positions).save_pretrained(directory)
    finally:
        if shown:
            logging.enable_progress_bar()
    word_level_tokenizer(cfg.vocab_size).save_pretrained(directory)
    return directory


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_source(source: Path, cfg: InfiniConfig) -> dict:
    """The `config.json` of a Hugging Face checkpoint, InputError unless it has `cfg`'s shape
    (what `convert --from hf` would have made MODEL from)."""
    from infini_trt.export.convert.common import read_json
    from infini_trt.export.convert.hf import config_from_hf

    if not source.is_dir():
        raise InputError(f"--peer-source {source} is not a directory (give the Hugging Face "
                         f"checkpoint MODEL was converted from)")
    raw = read_json(source / "config.json", "model config")
    theirs = config_from_hf(raw, cfg.segment_len, where=str(source / "config.json"))
    wrong = [f"{name} {getattr(theirs, name)} (MODEL: {getattr(cfg, name)})"
             for name in SHAPE_FIELDS if getattr(theirs, name) != getattr(cfg, name)]
    if wrong:
        raise InputError(f"--peer-source {source} is not the shape of MODEL: "
                         f"{', '.join(wrong)}")
    return raw


def source_fingerprint(source: Path) -> dict:
    """sha256 of every file of a Hugging Face checkpoint directory that the builder reads."""
    from .artifacts import file_sha256

    return {p.name: file_sha256(p) for p in sorted(source.iterdir())
            if p.is_file() and (p.suffix in (".json", ".safetensors", ".model", ".jinja"))}


def _stage_source(source: Path, directory: Path, vocab_size: int) -> Path:
    """A directory of links to the source's files (plus a word-level tokenizer where it has
    none), so that the builder reads the source as it is and writes nothing beside it."""
    directory.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            (directory / path.name).symlink_to(path.resolve())
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        word_level_tokenizer(vocab_size).save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------ the builder
def run_builder(hf_dir: Path, output: Path, precision: str, log_file: Path,
                work: Path) -> float:
    """onnxruntime-genai's model builder on `hf_dir` -> `output` (CPU, `precision`), its
    output to `log_file`, its temporary files in `work` -> the seconds it took.
    BuilderError (one line, with the log's last line) if it fails."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
               "-o", str(output), "-p", BUILDER_PRECISION[precision], "-e", "cpu",
               "-c", str(work), "--extra_options", *BUILDER_OPTIONS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                              stdin=subprocess.DEVNULL).returncode
    if code != 0 or not (output / "model.onnx").is_file():
        lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines()
                 if line.strip()]
        last = lines[-1] if lines else "no output"
        raise BuilderError(f"onnxruntime-genai's model builder failed (exit {code}): "
                           f"{last[:300]} (its output: {log_file})")
    return time.perf_counter() - t0


def graph_io(graph):
    """The I/O of the builder's graph (an onnx GraphProto) as a GraphSpec (past K/V ->
    present K/V)."""
    import onnx

    from infini_trt.export.io_spec import GraphSpec, TensorSpec

    axes: dict[str, tuple[int, None]] = {}

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
        axes.update({d: (1 if d != "past_sequence_length" else 0, None)
                     for d in dims if isinstance(d, str)})
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        return TensorSpec(value.name, dtype, dims)

    inputs = tuple(spec(v) for v in graph.input)
    outputs = tuple(spec(v) for v in graph.output)
    state = {t.name: t.name.replace("past_key_values", "present") for t in inputs
             if t.name.startswith("past_key_values.")}
    return GraphSpec("genai", inputs, outputs, axes, state)


def _quantization(graph) -> dict | None:
    """The builder's MatMulNBits settings (bits, block size, accuracy level), None if none."""
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        return None
    attrs = {a.name: a.i for a in nodes[0].attribute}
    return {"method": f"int{attrs.get('bits', 4)}", "tool": "onnxruntime-genai model builder",
            "matmuls": len(nodes), "block_size": attrs.get("block_size"),
            "accuracy_level": attrs.get("accuracy_level", 0)}


def write_manifest(directory: Path, cfg: InfiniConfig, source: dict, versions: dict) -> None:
    """The cache entry's manifest.json: every file the builder wrote with its sha256, the
    graph's I/O and quantization, the source and the tool versions."""
    import onnx

    from infini_trt.export.files import sha256_file
    from infini_trt.export.manifest import MANIFEST_FILE, Manifest

    model_file = directory / "model.onnx"
    model = onnx.load(str(model_file), load_external_data=False)
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir())
             if p.is_file() and p.name != MANIFEST_FILE}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    Manifest(path=directory, config=cfg, dtype="float32", memory_op="none", opset=opset,
             graphs={"genai": {"file": model_file.name, "files": files,
                               "io": graph_io(model.graph).to_dict()}},
             source=source, versions=versions,
             quantization=_quantization(model.graph)).write(directory)


def cached_genai(cfg: InfiniConfig, precision: str, seed: int = 0, max_positions: int = 0,
                 source: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> Path:
    """The builder's export of the peer model (`source`, or a random Llama of `cfg`'s shape
    from `seed` with `max_positions` positions) at `precision` (float32 | int4), made once
    and cached."""
    from infini_trt.export.files import atomic_dir

    from .export_cache import cached, cache_root

    genai = require_genai()
    _require_transformers()
    if precision not in BUILDER_PRECISION:
        raise InfiniTrtError(f"onnxruntime-genai peer precision {precision!r}: choose one of "
                             f"{', '.join(BUILDER_PRECISION)}")
    versions = {"onnxruntime-genai": genai.__version__,
                "transformers": package_version("transformers"),
                "torch": package_version("torch"), "builder_options": list(BUILDER_OPTIONS)}
    if source is not None:                           # the same files anywhere: one entry
        source = Path(source).resolve()
        raw = check_source(source, cfg)
        origin = {"peer": "onnxruntime-genai", "files_sha256": source_fingerprint(source),
                  "max_position_embeddings": raw.get("max_position_embeddings")}
    else:
        origin = {"peer": "onnxruntime-genai", "hf_config": llama_config(cfg, max_positions),
                  "seed": seed}
    key = hashlib.sha256(json.dumps({**origin, **versions, "precision": precision},
                                    sort_keys=True).encode()).hexdigest()[:20]
    if source is not None:
        origin["hf_source"] = str(source)            # where the entry was made from
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    log_file = cache_root() / "genai" / f"{key}.{BUILDER_LOG}"

    def make(target: Path) -> None:
        with atomic_dir(target, force=True) as tmp:
            work = Path(tmp) / ".work"
            if source is None:
                hf_dir = write_random_llama(cfg, seed, max_positions, work / "hf")
                origin["weights_sha256"] = source_fingerprint(hf_dir)["model.safetensors"]
            else:
                hf_dir = _stage_source(source, work / "hf", cfg.vocab_size)
            seconds = run_builder(hf_dir, Path(tmp), precision, log_file, work / "builder")
            shutil.rmtree(work)
            say(f"onnxruntime-genai's builder made the {precision} peer in {seconds:.1f} s")
            write_manifest(Path(tmp), cfg, {**origin, "builder_seconds": round(seconds, 2)},
                           versions)

    what = (f"building the onnxruntime-genai peer ({precision}) from "
            f"{source or f'a random Llama of this shape (seed {seed})'}")
    return cached("genai", key, make, what, say)


def genai_context_length(directory: str | Path) -> int:
    """The context length an export of the builder was made for (genai_config.json)."""
    config = json.loads((Path(directory) / "genai_config.json").read_text())
    return int(config["model"]["context_length"])


# ------------------------------------------------------------------------------ the runner
@dataclass
class KeptContext:
    """A prompt's context kept in a `GenaiRunner` (its generator, by the prompt's length) and
    the first token decoded after it: what `bench_measure.interleaved` restores."""

    key: int
    token: np.ndarray

    def restore(self, runner: "GenaiRunner") -> None:
        runner.resume(self.key)


class GenaiRunner(Runner):
    """onnxruntime-genai's Generator on the builder's export, behind the runner contract:
    batch 1, last-token logits (prefill) and one K/V cache over the whole context (no memory,
    nothing to fold). `capacity`: the tokens a new sequence's cache is allocated for."""

    backend = "onnxruntime-genai"

    def __init__(self, directory: str | Path, cfg: InfiniConfig, threads: int | None = None,
                 spinning: bool = True, stop_spinning_after_run: bool = False):
        """`threads`: its intra-op threads [default: onnxruntime-genai's]; `spinning=False`:
        its idle threads sleep at once instead of spinning; `stop_spinning_after_run`: they
        spin between the kernels of a run and stop when it returns (`session.
        force_spinning_stop`, what our runner does, ort_runner.session_options), for a
        process where other runners take turns with it (a pool left spinning takes a core
        from the next runner). The defaults are onnxruntime-genai's."""
        og = require_genai()
        self.og, self.config, self.directory = og, cfg, Path(directory)
        from infini_trt.export.manifest import read_manifest

        manifest = read_manifest(self.directory)
        self.precision = manifest.precision
        config = og.Config(str(self.directory))
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1} if threads else {}
        if not spinning:
            options |= {"session.intra_op.allow_spinning": "0",
                        "session.inter_op.allow_spinning": "0"}
        elif stop_spinning_after_run:   # (an option it passes on to ONNX Runtime: measured,
            options |= {"session.force_spinning_stop": "1"}    # no CPU used after a run)
        if options:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.context_limit = genai_context_length(self.directory)
        self.capacity = min(2 * cfg.segment_len + 2, self.context_limit)
        self.generator, self.kept = None, {}

    @property
    def description(self) -> str:
        return f"onnxruntime-genai {self.og.__version__} ({self.precision}, builder export)"

    def close(self) -> None:
        self.generator, self.kept, self.model = None, {}, None

    # sequences ---------------------------------------------------------------------------
    def _reset(self, batch: int) -> None:
        if batch != 1:
            raise InputError("the onnxruntime-genai peer runs at batch 1 (its Generator takes "
                             "a prompt in one call at batch > 1)")
        self.generator = None              # made on first use, for `capacity` tokens

    def _sequence(self):
        """The current sequence's Generator, made on first use (its cache for `capacity`
        tokens)."""
        if self.generator is None:
            params = self.og.GeneratorParams(self.model)
            params.set_search_options(max_length=self.capacity, batch_size=self.batch)
            self.generator = self.og.Generator(self.model, params)
        return self.generator

    def _append(self, ids: np.ndarray) -> np.ndarray:
        """Feed ids (1, S) -> the last token's logits (1, V)."""
        generator = self._sequence()
        if generator.token_count() + ids.shape[1] > self.capacity:
            raise InputError(f"the onnxruntime-genai K/V cache holds {self.capacity} tokens")
        generator.append_tokens(ids.astype(np.int32))
        logits = generator.get_logits()
        return np.ascontiguousarray(logits, dtype=np.float32).reshape(self.batch, -1)

    def _step(self, ids: np.ndarray) -> np.ndarray:
        raise InputError("the onnxruntime-genai peer gives the last token's logits only")

    def _advance(self, ids: np.ndarray) -> np.ndarray:
        return self._append(ids)

    def _extend(self, ids: np.ndarray, start: np.ndarray, length: np.ndarray,
                rows: np.ndarray) -> np.ndarray:
        if not (length == ids.shape[1]).all():
            raise InputError("the onnxruntime-genai peer takes equal-length batches only")
        last = self._append(ids)
        # only the last token's logits are computed: every row asked for reads them (a view)
        return np.broadcast_to(last[:, None, :], (*rows.shape, last.shape[-1]))

    def _fold(self, mask: np.ndarray) -> None:
        """Nothing to fold: the cache keeps every token."""

    # kept contexts (bench_measure.interleaved) ---------------------------------------------
    def keep(self, token: np.ndarray) -> KeptContext:
        """Keep the current sequence's context (its generator; an empty one after a reset)
        under its length; the next `reset` starts a new one."""
        generator = self._sequence()
        key = generator.token_count()
        self.kept[key], self.generator = generator, None
        return KeptContext(key, token)

    def resume(self, key: int) -> None:
        """Continue from a kept context, rewound to its length."""
        self.generator = self.kept[key]
        self.generator.rewind_to(key)
