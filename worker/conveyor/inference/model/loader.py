"""Load one rank's part of a HF safetensors checkpoint into a ``StageModel``.

nanoGPT's discipline: before a byte is copied, every tensor name and shape of the checkpoint is checked
against what the config implies (missing or unexpected tensors are errors, listed). Then each rank
reads only its stage's tensors and, under tensor parallelism, only its slice of each
(``safe_open(...).get_slice``), so a rank's peak host memory is its shard, not the model.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from torch import nn

from conveyor.inference.kernels.compile_cache import cpu_share
from conveyor.inference.model.checkpoint_layout import (  # noqa: F401 (re-exported: they were defined here)
    CheckpointError,
    expected_shapes,
    read_header,
    stage_layers,
    verify_checkpoint,
    weight_files,
)
from conveyor.inference.model.families import Arch, LayerLinear, NameMap, name_map
from conveyor.inference.model.stage_model import StageModel, local_arch
from conveyor.inference.model.staging import FileToDevice, PinnedStaging
from conveyor.inference.pipeline.tensor_parallel import Policy, check_divisible, plan_layer, shard_range
from conveyor.log import get_logger

log = get_logger("conveyor.loader")
LOAD_LOG_SECONDS = 10.0  # a load that ends sooner logs no progress line


class LoadProgress:
    """A "loading weights" line every ``every`` seconds of a long load (a large shard from slow storage
    can take minutes): bytes loaded of the rank's total, the rate and the time left."""

    def __init__(self, total_bytes: int, every: float, clock: Callable[[], float] = time.monotonic):
        self.total, self.every, self.clock = total_bytes, every, clock
        self.done = 0
        self.start = self.last = clock()

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        log.info(
            "loading weights",
            extra={
                "loaded_gb": round(self.done / 1e9, 2),
                "total_gb": round(self.total / 1e9, 2),
                "percent": round(100 * self.done / max(self.total, 1), 1),
                "gb_per_second": round(rate / 1e9, 2),
                "eta_seconds": round((self.total - self.done) / max(rate, 1e-9), 1),
            },
        )


def open_tensors(files: list[Path], stack: ExitStack) -> dict[str, Any]:
    """Each tensor name of ``files`` -> the open safetensors handle of its file (headers read, no data),
    closed with ``stack``."""
    handles: dict[str, Any] = {}
    for fname in files:
        handle = stack.enter_context(safe_open(str(fname), framework="pt"))
        for key in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
            handles[key] = handle
    return handles


# safetensors' dtype names (its format's spec)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass(frozen=True)
class TensorSpan:
    """Where a tensor's bytes lie in its safetensors file (row-major, contiguous)."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def tensor_spans(path: Path) -> dict[str, TensorSpan]:
    """Each tensor of a safetensors file and where it lies: its header (read_header, checked) gives each
    tensor's byte range after the header, whose length is the file's first 8 bytes (little-endian).
    safetensors' API reads tensors but does not say where they are."""
    header = read_header(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    spans: dict[str, TensorSpan] = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: {name} has dtype {info['dtype']}, which a model cannot load")
        begin = cast(list[int], info["data_offsets"])[0]  # read_header checked both are ints
        shape = tuple(cast(list[int], info["shape"]))
        spans[name] = TensorSpan(path, 8 + length + begin, _DTYPES[str(info["dtype"])], shape)
    return spans


class Checkpoint:
    """The tensors of a checkpoint directory, read lazily (headers only until a slice is asked for)."""

    def __init__(
        self, model_dir: str | Path, files: list[Path] | None = None, device: torch.device | str | None = None
    ):
        """``files``: the safetensors files themselves (``model_dir`` then only names the checkpoint in
        messages); None: those of ``model_dir`` (its index, else every ``*.safetensors``). ``device`` a
        device: reads return tensors on it, read from the files by several threads (staging.FileToDevice),
        on a GPU through pinned buffers and never a host tensor; None: memory-mapped host tensors."""
        self.dir = Path(model_dir)
        if files is None:
            files = weight_files(self.dir)
        self._stack = ExitStack()
        self._handles = open_tensors(files, self._stack)
        # BertFor* checkpoints prefix the encoder with "bert."; BertModel ones do not.
        self.prefix = "bert." if any(k.startswith("bert.") for k in self._handles) else ""
        self._direct: FileToDevice | None = None
        if device is not None:
            self._spans = {k: v for f in files for k, v in tensor_spans(f).items()}
            self._direct = self._stack.enter_context(
                FileToDevice(torch.device(device), threads=min(8, cpu_share()))
            )

    def close(self) -> None:
        self._stack.close()

    def names(self) -> set[str]:
        return {k.removeprefix(self.prefix) for k in self._handles}

    def has(self, name: str) -> bool:
        return self.prefix + name in self._handles

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.prefix + name].get_slice(self.prefix + name).get_shape())

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The whole tensor, or rows (dim 0) / columns (dim 1) [start, stop) of it, read as a slice."""
        if self._direct is not None:
            return self._read_to_device(self.prefix + name, dim, start, stop)
        sl = self._handles[self.prefix + name].get_slice(self.prefix + name)
        if dim is None:
            return sl[:]
        return sl[start:stop] if dim == 0 else sl[:, start:stop]

    def _read_to_device(self, key: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """Rows are contiguous in the file: only their bytes are read. Columns are not: the whole tensor is
        read (every page holds some of them, so a memory-mapped slice reads as much) and cut on the GPU."""
        assert self._direct is not None
        span = self._spans[key]
        shape = list(span.shape)
        offset = span.offset
        if dim == 0:
            row = span.dtype.itemsize * math.prod(shape[1:])
            offset += start * row
            shape[0] = stop - start
        out = torch.empty(shape, dtype=span.dtype, device=self._direct.device)
        if out.numel():
            self._direct.read(span.path, offset, out.view(-1).view(torch.uint8))
        return out[:, start:stop] if dim == 1 else out

    def release(self, prefix: str) -> None:
        """The loader is done with every tensor under ``prefix`` (one layer). Files hold nothing in memory."""


class StateDictTensors(Checkpoint):
    """A model's tensors already in memory (an HF module's ``state_dict()``) behind ``Checkpoint``'s
    reads: a slice is a view, copied once into the stage model's parameter, so building a tensor-parallel
    rank from a live HF model writes nothing to disk and never copies a whole weight it does not keep."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        label: str = "state_dict",
        on_release: Callable[[str], None] | None = None,
    ):
        """``on_release(prefix)``: called once the loader has copied its slices of every tensor under
        ``prefix`` (with ``self.prefix``), so the owner can free them (kernel_inject.py frees the HF
        module's layer); the views kept here are dropped first."""
        self.dir = Path(f"<{label}>")
        self._tensors = tensors
        self._on_release = on_release
        self.prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""

    def close(self) -> None:
        pass

    def names(self) -> set[str]:
        return {k.removeprefix(self.prefix) for k in self._tensors}

    def has(self, name: str) -> bool:
        return self.prefix + name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[self.prefix + name].shape)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        t = self._tensors[self.prefix + name].detach()
        return t if dim is None else t.narrow(dim, start, stop - start)

    def release(self, prefix: str) -> None:
        full = self.prefix + prefix
        for key in [k for k in self._tensors if k.startswith(full)]:
            del self._tensors[key]  # a state_dict entry shares the module's storage: drop it too
        if self._on_release is not None:
            self._on_release(full)


@dataclass(frozen=True)
class Shard:
    tp_rank: int = 0
    tensor_parallel: int = 1


class _LayerReader:
    """Reads one layer's tensors for one tensor-parallel rank, in our (torch, fused) layout.
    ``bias_on_rank0``: a row-parallel bias whole on tensor rank 0 and zeros elsewhere (inference sums
    the ranks' outputs, bias included); False: whole on every rank (training adds it after the sum)."""

    def __init__(
        self,
        ckpt: Checkpoint,
        arch: Arch,
        names: NameMap,
        shard: Shard,
        prefix: str,
        bias_on_rank0: bool = True,
    ):
        self.ckpt, self.arch, self.names, self.shard, self.prefix = ckpt, arch, names, shard, prefix
        self.bias_on_rank0 = bias_on_rank0

    def _rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Output rows [start, stop) of a linear weight (or a bias), torch layout [rows, in]."""
        full = self.prefix + name
        if name.endswith(".bias"):
            return self.ckpt.read(full, 0, start, stop)
        if self.names.conv1d:  # stored [in, out]
            return self.ckpt.read(full, 1, start, stop).t().contiguous()
        return self.ckpt.read(full, 0, start, stop)

    def _cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Input columns [start, stop) of a linear weight, torch layout [out, cols]."""
        full = self.prefix + name
        if self.names.conv1d:
            return self.ckpt.read(full, 0, start, stop).t().contiguous()
        return self.ckpt.read(full, 1, start, stop)

    def heads(self, lin: LayerLinear, suffix: str, kv: bool) -> torch.Tensor:
        a, s = self.arch, self.shard
        n = a.kv_heads if kv else a.heads
        lo, hi = shard_range(n, s.tensor_parallel, s.tp_rank)
        return self._rows(lin.name + suffix, lo * a.head_dim, hi * a.head_dim)

    def qkv(self, linears: dict[str, LayerLinear], suffix: str) -> torch.Tensor:
        """Our fused wqkv rows: this rank's q heads | k heads | v heads."""
        a, s = self.arch, self.shard
        if "qkv_heads" in linears:  # GPT-NeoX rows: [heads, (q | k | v), head_dim]
            lo, hi = shard_range(a.heads, s.tensor_parallel, s.tp_rank)
            t = self._rows(linears["qkv_heads"].name + suffix, lo * 3 * a.head_dim, hi * 3 * a.head_dim)
            t = t.reshape(hi - lo, 3, a.head_dim, -1)  # [local heads, 3, head_dim, in (or 1 for bias)]
            parts = [t[:, j].reshape((hi - lo) * a.head_dim, -1) for j in range(3)]
            return torch.cat(parts).squeeze(-1) if suffix == ".bias" else torch.cat(parts)
        if "qkv_blocks" in linears:  # GPT-2 output columns: q block | k block | v block
            lo, hi = shard_range(a.heads, s.tensor_parallel, s.tp_rank)
            block, name = a.heads * a.head_dim, linears["qkv_blocks"].name + suffix
            return torch.cat(
                [self._rows(name, j * block + lo * a.head_dim, j * block + hi * a.head_dim) for j in range(3)]
            )
        return torch.cat(
            [
                self.heads(linears["q"], suffix, kv=False),
                self.heads(linears["k"], suffix, kv=True),
                self.heads(linears["v"], suffix, kv=True),
            ]
        )

    def row_parallel(self, lin: LayerLinear, suffix: str, total: int) -> torch.Tensor:
        s = self.shard
        if suffix == ".bias":
            bias = self.ckpt.read(self.prefix + lin.name + suffix)
            # Added once: the all-reduce sums the ranks' outputs, so only rank 0 keeps the bias.
            return bias if s.tp_rank == 0 or not self.bias_on_rank0 else torch.zeros_like(bias)
        lo, hi = shard_range(total, s.tensor_parallel, s.tp_rank)
        return self._cols(lin.name + suffix, lo, hi)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        a, s = self.arch, self.shard
        by_kind = {lin.kind: lin for lin in self.names.linears}
        mlp_lo, mlp_hi = shard_range(a.intermediate, s.tensor_parallel, s.tp_rank)
        suffixes = [".weight", ".bias"]
        for suffix in suffixes:
            if suffix == ".weight" or a.qkv_bias:
                yield "attn.wqkv" + suffix, self.qkv(by_kind, suffix)  # type: ignore[arg-type]
            if suffix == ".weight" or a.out_bias:
                yield "attn.wo" + suffix, self.row_parallel(by_kind["o"], suffix, a.heads * a.head_dim)
            if suffix == ".weight" or a.mlp_bias:
                ins = [by_kind["gate"], by_kind["up"]] if a.gated_mlp else [by_kind["up"]]
                yield (
                    "mlp.w_in" + suffix,
                    torch.cat([self._rows(x.name + suffix, mlp_lo, mlp_hi) for x in ins]),
                )
                yield "mlp.w_out" + suffix, self.row_parallel(by_kind["down"], suffix, a.intermediate)
        for norm in self.names.norms:
            yield f"{norm.ours}.weight", self.ckpt.read(f"{self.prefix}{norm.name}.weight")
            if a.norm == "layer":
                yield f"{norm.ours}.bias", self.ckpt.read(f"{self.prefix}{norm.name}.bias")


def _global(ckpt: Checkpoint, names: NameMap, ours: str) -> torch.Tensor | None:
    for hf in names.globals_.get(ours, ()):
        if ckpt.has(hf):
            return ckpt.read(hf)
    return None


def load_stage(
    model_dir: str | Path | Checkpoint,
    arch: Arch,
    *,
    stages: int = 1,
    stage: int = 0,
    shard: Shard | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    policy: Policy | None = None,
) -> StageModel:
    """Build this rank's ``StageModel`` and fill it with its (sharded) tensors from ``model_dir`` (a
    checkpoint directory, or an open ``Checkpoint``: files or tensors in memory)."""
    shard = shard or Shard()
    check_divisible(arch, shard.tensor_parallel)
    names = name_map(arch)
    plan_layer(arch, names, policy)  # refuses an inconsistent policy before reading weights
    layers = stage_layers(arch.layers, stages, stage)
    first, last = stage == 0, stage == stages - 1
    if not isinstance(model_dir, Checkpoint):
        # To a GPU the files are read straight into its memory; on the host, memory-mapped slices keep a
        # rank's reads to its shard (a column slice read directly would read the whole tensor).
        model_dir = Checkpoint(model_dir, device=device if torch.device(device).type == "cuda" else None)
    ckpt = model_dir
    staging: PinnedStaging | None = None  # made at the first host tensor bound for a GPU (none from files)
    with ExitStack() as stack:  # on the way out: the staged transfers finish, then the files close
        stack.callback(ckpt.close)
        verify_checkpoint(ckpt, arch, names)
        # Parameters stay on the meta device until their slice is read: the stage model grows as it is
        # filled, so a source freed layer by layer (StateDictTensors.release) keeps the peak near one copy.
        with torch.device("meta"):
            model = StageModel(local_arch(arch, shard.tensor_parallel), layers, first, last).to(dtype)
        params = dict(model.named_parameters())
        loaded: set[str] = set()
        to_gpu = torch.device(device).type == "cuda"
        tied = first and last and arch.tie_embeddings and arch.causal  # the head is the embedding, not read
        to_read = [p for name, p in params.items() if not (tied and name == "lm_head.weight")]
        progress = LoadProgress(sum(p.numel() * dtype.itemsize for p in to_read), LOAD_LOG_SECONDS)

        def put(ours: str, tensor: torch.Tensor) -> None:
            nonlocal staging
            p = params[ours]
            if tuple(tensor.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{ours}: read shape {list(tensor.shape)}, model expects {list(p.shape)}"
                )
            # a new tensor, never a view of the source (which may be freed next)
            value = torch.empty(p.shape, dtype=dtype, device=device)
            with torch.no_grad():
                if to_gpu and tensor.device.type == "cpu":
                    if staging is None:
                        staging = stack.enter_context(PinnedStaging(torch.device(device)))
                    # asynchronous: the source is copied out before this returns
                    staging.copy(value, tensor)
                else:
                    value.copy_(tensor)
            owner, _, attr = ours.rpartition(".")
            model.get_submodule(owner)._parameters[attr] = nn.Parameter(value, requires_grad=p.requires_grad)
            loaded.add(ours)
            progress.add(value.numel() * value.element_size())

        for local, layer in enumerate(layers):
            prefix = names.layer_prefix.format(i=layer)
            reader = _LayerReader(ckpt, arch, names, shard, prefix)
            for ours, tensor in reader.tensors():
                put(f"layers.{local}.{ours}", tensor)
                del tensor  # a fused copy (q|k|v, gate|up) is not kept while the next one is made
            ckpt.release(prefix)
        wanted: list[tuple[str, str]] = []
        if first:
            wanted += [
                ("embed.weight", "embed"),
                ("pos_embed.weight", "pos_embed"),
                ("project_in.weight", "project_in"),
            ]
            wanted += [("type_embed.weight", "type_embed"), ("embed_norm.weight", "embed_norm.weight")]
            wanted += [("embed_norm.bias", "embed_norm.bias")]
        if last and arch.causal:
            wanted += [("final_norm.weight", "final_norm.weight"), ("final_norm.bias", "final_norm.bias")]
            wanted += [("project_out.weight", "project_out"), ("lm_head.weight", "lm_head")]
        for ours, key in wanted:
            if ours not in params or (tied and ours == "lm_head.weight"):  # tied below, not read twice
                continue
            found = _global(ckpt, names, key)
            if found is None and key == "lm_head" and arch.tie_embeddings:
                found = _global(ckpt, names, "embed")  # tied: the LM head is the input embedding
            if found is None:
                raise CheckpointError(f"{ckpt.dir}: no tensor for {ours} ({names.globals_.get(key)})")
            put(ours, found)
        if tied:
            model.lm_head.weight = model.embed.weight  # one tensor, as in HF
            loaded.add("lm_head.weight")
        left = set(params) - loaded
        if left:
            raise CheckpointError(f"parameters not loaded from {ckpt.dir}: {sorted(left)}")
    return model.eval()
