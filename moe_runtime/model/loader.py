"""Load a Hugging Face Mixtral checkpoint (config.json + one or several safetensors files) into the model.

Everything is checked before any weight is read: the index and every shard it names, each file's header,
and every tensor's name and shape against what the config implies. Any problem is a `CheckpointError`
naming the tensor and the file. Weights are read through safetensors' mmap, converted to the requested
dtype, and experts are stacked per layer (w1 and w3 into w13 [E, 2I, D], w2 into [E, D, I]). The model is
returned only once every tensor is in place, so nothing half-loaded is ever used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moe_runtime.config import ModelConfig, OffloadConfig
from moe_runtime.errors import CheckpointError, ConfigError
from moe_runtime.model.mixtral import MixtralForCausalLM, RotaryEmbedding

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some exporters save that carry no information (recomputed from the config).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hub tensor name -> shape for a Mixtral checkpoint with this config."""
    D, I, V, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    H, KVH, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_local_experts
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (H * Dh, D)
        shapes[p + "self_attn.k_proj.weight"] = (KVH * Dh, D)
        shapes[p + "self_attn.v_proj.weight"] = (KVH * Dh, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, H * Dh)
        shapes[p + "block_sparse_moe.gate.weight"] = (E, D)
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes[q + "w1.weight"] = (I, D)
            shapes[q + "w2.weight"] = (D, I)
            shapes[q + "w3.weight"] = (I, D)
    return shapes


class CheckpointFiles:
    """The safetensors files of a checkpoint, opened (mmap) and checked against the config.

    Use as a context manager; `get(name)` reads one tensor. The expert store reuses this to keep cold
    experts in the mmap instead of in memory.
    """

    def __init__(self, model_dir: str | Path, cfg: ModelConfig):
        self.dir = Path(model_dir)
        self._stack = ExitStack()
        self._files: dict[str, object] = {}
        self.location = self._resolve()  # tensor name -> file name
        try:
            self._open_and_check(cfg)
        except BaseException:
            self.close()
            raise

    def _resolve(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            for name, shard in sorted(weight_map.items()):
                if not (self.dir / shard).is_file():
                    raise CheckpointError(f"{index}: shard {shard} (holding tensor {name}) is missing from {self.dir}")
            return dict(weight_map)
        if (self.dir / SINGLE_FILE).is_file():
            return {}  # filled from the file's header in _open_and_check
        raise CheckpointError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def _open_and_check(self, cfg: ModelConfig) -> None:
        files = sorted(set(self.location.values())) or [SINGLE_FILE]
        found: dict[str, str] = {}
        for fname in files:
            try:
                handle = self._stack.enter_context(safe_open(str(self.dir / fname), framework="pt", device="cpu"))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{self.dir / fname}: truncated or corrupt safetensors file ({e})") from None
            self._files[fname] = handle
            for name in handle.keys():
                found[name] = fname
        if self.location:
            for name, fname in sorted(self.location.items()):
                if found.get(name) != fname:
                    raise CheckpointError(f"{self.dir / fname}: tensor {name} is named in {INDEX_FILE} but absent")
        self.location = found
        expected = expected_tensors(cfg)
        for name, shape in expected.items():
            if name not in found:
                raise CheckpointError(f"{self.dir}: tensor {name} is missing (expected shape {list(shape)})")
            got = tuple(self._files[found[name]].get_slice(name).get_shape())
            if got != shape:
                raise CheckpointError(
                    f"{self.dir / found[name]}: tensor {name} has shape {list(got)}, expected {list(shape)}"
                )
        for name, fname in sorted(found.items()):
            tied_head = name == "lm_head.weight" and cfg.tie_word_embeddings
            if name not in expected and not tied_head and not _IGNORED.fullmatch(name):
                raise CheckpointError(f"{self.dir / fname}: unexpected tensor {name} for a {cfg.architecture}")

    def get(self, name: str) -> torch.Tensor:
        fname = self.location[name]
        try:
            return self._files[fname].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.dir / fname}: cannot read tensor {name} ({e})") from None

    def nbytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in set(self.location.values()))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_dtype(dtype: str, cfg: ModelConfig) -> torch.dtype:
    if dtype == "auto":
        return _DTYPES[cfg.torch_dtype]
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; allowed: ['auto', {', '.join(map(repr, _DTYPES))}]")
    return _DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available on this host; allowed here: ['auto', 'cpu']")
    return torch.device(device)


def load_model(
    model_dir: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    moe_backend: str = "auto",
    progress: bool = False,
    offload: OffloadConfig | None = None,
    experts: bool = True,
) -> MixtralForCausalLM:
    """Build a `MixtralForCausalLM` from a HF checkpoint directory. Raises `CheckpointError` on any defect.

    With `offload.enabled` the experts are not loaded: an `offload.ExpertStore` keeps a budget of them
    resident and reads the rest from the checkpoint (`model.expert_store`). With `experts=False` they are
    not loaded either, and nothing replaces them: every block's w13/w2 hold 0 experts until the caller
    fills them (the Ray workers read only their own; every tensor is still checked).
    """
    offloaded = offload is not None and offload.enabled
    if offloaded and not experts:
        raise ConfigError("load_model: offload.enabled with experts=False; the expert store needs the experts")
    skip_experts = offloaded or not experts
    try:
        cfg = ModelConfig.from_pretrained(model_dir)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    torch_dtype, dev = resolve_dtype(dtype, cfg), resolve_device(device)
    with CheckpointFiles(model_dir, cfg) as ckpt:
        with torch.device("meta"):
            model = MixtralForCausalLM(cfg, moe_backend)
        if skip_experts:
            from moe_runtime.offload.attach import empty_experts

            empty_experts(model)
        model = model.to(torch_dtype).to_empty(device=dev)
        model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).to(dev)  # buffers are not in checkpoints
        model.router_counts.zero_()
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        with torch.no_grad():
            targets = dict(_assignments(model, ckpt, experts=not skip_experts))
            read, reader = ckpt.get, None
            if skip_experts:  # pread, not the mmap: touched mmap pages would stay in RSS (offload/safetensors_reader)
                from moe_runtime.offload.safetensors_reader import SafetensorsReader

                reader = SafetensorsReader(model_dir, {n: ckpt.location[n] for n in targets})
                read = reader.get
            for name, copy in _progress(iter(targets.items()), len(targets), progress):
                copy(read(name))
            if reader is not None:
                reader.close()
        if offloaded:
            from moe_runtime.offload.attach import attach_expert_store

            attach_expert_store(model, model_dir, offload, ckpt.location)
    return model.eval()


def _assignments(model: MixtralForCausalLM, ckpt: CheckpointFiles, experts: bool = True
                 ) -> Iterator[tuple[str, object]]:
    """(hub tensor name, function that copies it into the model), in file order for sequential mmap reads.

    experts=False leaves the expert matrices out (the expert store reads them itself).
    """
    I = model.config.intermediate_size
    targets: dict[str, object] = {
        "model.embed_tokens.weight": model.embed_tokens.weight.copy_,
        "model.norm.weight": model.norm.weight.copy_,
    }
    if not model.config.tie_word_embeddings:
        targets["lm_head.weight"] = model.lm_head.weight.copy_
    for l, layer in enumerate(model.layers):
        p = f"model.layers.{l}."
        targets[p + "input_layernorm.weight"] = layer.input_layernorm.weight.copy_
        targets[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.copy_
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            targets[f"{p}self_attn.{proj}.weight"] = getattr(layer.self_attn, proj).weight.copy_
        moe = layer.block_sparse_moe
        targets[p + "block_sparse_moe.gate.weight"] = moe.gate.weight.copy_
        for e in range(model.config.num_local_experts if experts else 0):
            q = f"{p}block_sparse_moe.experts.{e}."
            targets[q + "w1.weight"] = moe.w13[e, :I].copy_  # gate rows
            targets[q + "w3.weight"] = moe.w13[e, I:].copy_  # up rows
            targets[q + "w2.weight"] = moe.w2[e].copy_
    for name in sorted(targets, key=lambda n: (ckpt.location[n], n)):
        yield name, targets[name]


def _progress(items: Iterator, total: int, enabled: bool) -> Iterator:
    if not enabled:
        yield from items
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("loading weights", total=total)
        for item in items:
            yield item
            bar.advance(task)
