"""One compact transformer for every supported family (gpt-fast style), built for one pipeline stage.

``StageModel(arch, layer_ids, first, last)`` holds only its stage's layers: the embeddings when
``first``, the final norm and LM head when ``last``. It knows nothing of parallelism: tensor parallelism
builds it from an ``Arch`` whose head and MLP widths are already divided (``local_arch``) and loads
sharded weights into it; the all-reduce after each row-parallel layer is a hook added from outside
(tensor_parallel.py).

Decoding works on *lanes*: rows of a static KV cache, each with its own position, so sequences of
different lengths share a batch and one can join or leave at any step. A forward pass takes a
contiguous range of lanes and per-token positions as tensors; shapes depend only on (lanes, tokens),
so the decode step has static shapes (capturable by CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from conveyor.inference.model import kv_cache
from conveyor.inference.model.families import Arch
from conveyor.inference.model.kv_cache import KVCache, LayerCache, refuse_if_too_large

# HF activation names -> functions (the tanh form is HF's gelu_new / gelu_pytorch_tanh / gelu_fast).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_fast": partial(F.gelu, approximate="tanh"),
}
ACTIVATION_NAMES = {"silu": "silu", "swish": "silu"}  # the gates skinny_matmul's kernel applies


def local_arch(arch: Arch, tensor_parallel: int) -> Arch:
    """The widths one tensor-parallel rank holds (checked divisible by tensor_parallel.check_divisible)."""
    t = tensor_parallel
    return dataclasses.replace(
        arch, heads=arch.heads // t, kv_heads=arch.kv_heads // t, intermediate=arch.intermediate // t
    )


class Norm(nn.Module):
    def __init__(self, arch: Arch, dim: int):
        super().__init__()
        self.rms = arch.norm == "rms"
        self.eps = arch.norm_eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(dim))
        # One kernel for the eager passes (kernels/elementwise.py, set from outside); None where it
        # does not serve the input. Compiled passes leave it to inductor.
        self.fused: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self.fused is not None:
            y = self.fused(x, self.weight, self.eps)
            if y is not None:
                return y
        if not self.rms:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        # RMSNorm in float32, cast back before the weight (as HF Llama does: bitwise the same in fp32).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [n, heads, S, head_dim]; cos, sin: [n, 1, S, rotary_dim] (GPT-NeoX rotates a prefix only)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# A fused decode attention kernel (decode_attention.attend's signature): q, the layer's cache (K, V and a
# float8 cache's scales), positions [n, 1], lanes [n], kv_len, sliding window (0: none), scale ->
# [n, heads, 1, D], or None
# where it does not serve these inputs. Set on a model from outside (StageModel.decode_kernel), so the
# model imports no kernel.
DecodeKernel = Callable[..., "torch.Tensor | None"]
# Causal attention over packed prompts: q [T, heads, D], k, v [T, kv_heads, D], cu_seqlens, the longest
# prompt's length, scale -> [T, heads, D]. Set on a model from outside (StageModel.packed_attention).
PackedAttention = Callable[..., torch.Tensor]
# How a forward pass runs one layer: layer(x, step, cache) by default; a compiled function in prompt
# passes (cuda_graphs.py compiles one layer and reuses it for all).
RunLayer = Callable[["Block", torch.Tensor, "Step", "LayerCache | None"], torch.Tensor]


@dataclasses.dataclass
class Step:
    """What every layer of one forward pass shares: computed once per pass, not once per layer."""

    positions: torch.Tensor  # [n, S]
    lanes: torch.Tensor  # [n, 1] cache lane of each sequence
    kv_len: int  # cache slots read: [0, kv_len)
    mask: torch.Tensor | None  # [n, 1, S, kv_len] key visible to query; None for a causal prefill from 0
    rope: tuple[torch.Tensor, torch.Tensor] | None
    decode_kernel: DecodeKernel | None = None
    # A packed prefill (StageModel.forward): the prompts' tokens in one row, prompt i holding tokens
    # cu_seqlens[i]:cu_seqlens[i + 1]; attended by ``packed_attention`` (packed_attention.attend's
    # signature) within each prompt. ``lanes`` and ``positions`` are then per token, [1, T].
    cu_seqlens: torch.Tensor | None = None
    longest: int = 0
    packed_attention: PackedAttention | None = None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):  # type: ignore[no-untyped-def]
    """q [n, heads, S, D], k/v [n, kv_heads, L, D], mask [n, 1, S, L] -> [n, heads, S, D].

    For decode where decode_attention.py's kernel does not serve (no Triton, float32, an odd head size).
    A fused attention kernel with an explicit mask measured 7 us a layer at batch 1 and 80 us at batch
    64 on an H200, cuBLAS's batched GEMV for q.k and p.v 45 us at batch 64, against 6 us to read the
    keys once. So under torch.compile the products are written as broadcast-multiply-sum, which
    inductor turns into reductions that read K and V once; eager runs (CPU, graphs off) use SDPA,
    where the broadcast would be materialised. Rounding follows flash attention's: q.k and the softmax
    in fp32, p rounded to the compute dtype, p.v accumulated in fp32. The heads sharing a KV head (GQA)
    are folded into the query rows, so K and V are never repeated."""
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
    n, heads, s, d = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qg = q.reshape(n, kv_heads, group * s, d)  # HF's repeat_kv order: the heads of one KV head are adjacent
    # [n, kv, group*S, 1, D] * [n, kv, 1, L, D] summed over D -> scores [n, kv, group*S, L]
    scores = (qg[:, :, :, None, :].float() * k[:, :, None, :, :].float()).sum(-1) * scale
    scores = scores.view(n, kv_heads, group, s, length).masked_fill(~mask[:, :, None], float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype).view(n, kv_heads, group * s, length)
    # [n, kv, group*S, L, 1] * [n, kv, 1, L, D] summed over L
    y = (probs[..., None].float() * v[:, :, None, :, :].float()).sum(-2).to(q.dtype)
    return y.view(n, heads, s, d)


class Attention(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = arch.heads, arch.kv_heads, arch.head_dim
        self.sliding_window = arch.sliding_window
        qkv_out = (arch.heads + 2 * arch.kv_heads) * arch.head_dim
        self.wqkv = nn.Linear(arch.hidden, qkv_out, bias=arch.qkv_bias)
        self.wo = nn.Linear(arch.heads * arch.head_dim, arch.hidden, bias=arch.out_bias)
        # Rotates q's and k's heads of the qkv rows in place, in one kernel, for the eager passes
        # (kernels/elementwise.py, set from outside): whether it did.
        self.fused_rotary: Callable[..., bool] | None = None
        # And writes k and v from those rows into the cache in one kernel: whether it did.
        self.fused_write_kv: Callable[..., bool] | None = None

    def forward(self, x: torch.Tensor, step: Step, cache: LayerCache | None) -> torch.Tensor:
        n, s, _ = x.shape
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = self.wqkv(x)
        rotated = (
            step.rope is not None
            and not torch.compiler.is_compiling()
            and self.fused_rotary is not None
            and self.fused_rotary(qkv, *step.rope, self.heads + self.kv_heads, self.head_dim)
        )
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(n, s, self.heads, self.head_dim).transpose(1, 2)  # [n, heads, S, head_dim]
        k = k.view(n, s, self.kv_heads, self.head_dim).transpose(1, 2)  # [n, kv_heads, S, head_dim]
        v = v.view(n, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if step.rope is not None and not rotated:
            q, k = apply_rotary(q, *step.rope), apply_rotary(k, *step.rope)
        scale = 1.0 / math.sqrt(self.head_dim)
        gqa = self.kv_heads != self.heads
        if cache is not None:
            # the whole layer [lanes, kv_heads, L, head_dim] (and a float8 cache's scales), written in place
            written = (
                (rotated or step.rope is None)  # k in the qkv rows is final
                and not torch.compiler.is_compiling()
                and self.fused_write_kv is not None
                and self.fused_write_kv(qkv, cache, step.lanes, step.positions, self.heads, self.kv_heads)
            )
            if not written:
                kv_cache.write(cache, step.lanes, step.positions, k, v)
            if s == 1 and step.mask is not None and step.decode_kernel is not None:
                y = step.decode_kernel(
                    q,
                    cache,
                    step.positions,
                    step.lanes[:, 0],
                    step.kv_len,
                    self.sliding_window or 0,
                    scale,
                )
                if y is not None:
                    return self.wo(y.transpose(1, 2).reshape(n, s, q_size))
            if step.mask is not None:  # [n, kv_heads, kv_len, head_dim]
                k, v = kv_cache.read(cache, step.lanes[:, 0], step.kv_len, q.dtype)
        if step.cu_seqlens is not None and step.packed_attention is not None:  # prompts packed in a row
            q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # [T, heads, D]
            y = step.packed_attention(q, k, v, step.cu_seqlens, step.longest, scale).transpose(0, 1)[None]
        elif step.mask is None:  # prefill from position 0: only this pass's keys, causal (flash attention)
            # causal even for a prompt of one token (one key: the same); ``s > 1`` is a symbol when compiled
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        elif s == 1:
            y = decode_attention(q, k, v, step.mask, scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, scale=scale, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(n, s, q_size))  # [n, S, heads * head_dim] -> hidden


class MLP(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.gated = arch.gated_mlp
        width = arch.intermediate * (2 if self.gated else 1)  # gated: rows are gate | up
        self.w_in = nn.Linear(arch.hidden, width, bias=arch.mlp_bias)
        self.w_out = nn.Linear(arch.intermediate, arch.hidden, bias=arch.mlp_bias)
        self.act = ACTIVATIONS[arch.activation]
        self.gated_activation = ACTIVATION_NAMES.get(arch.activation) if self.gated else None
        # Set by skinny_matmul.route_linears: w_in returns act(gate) * up itself (at decode, from the
        # kernel that reads its weight: no kernel writes or reads gate and up).
        self.up_applies_gate = False
        # silu(gate) * up in one kernel for the eager passes (kernels/elementwise.py, set from outside)
        self.fused_gate: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up_applies_gate:
            return self.w_out(self.w_in(x))
        h = self.w_in(x)
        if not torch.compiler.is_compiling() and self.fused_gate is not None:
            y = self.fused_gate(h)
            if y is not None:
                return self.w_out(y)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.w_out(self.act(gate) * up)
        return self.w_out(self.act(h))


class Block(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.pre_norm = arch.norm_position == "pre"
        self.parallel_residual = arch.parallel_residual
        self.attn_norm, self.mlp_norm = Norm(arch, arch.hidden), Norm(arch, arch.hidden)
        self.attn, self.mlp = Attention(arch), MLP(arch)

    def forward(self, x: torch.Tensor, step: Step, cache: LayerCache | None) -> torch.Tensor:
        if self.parallel_residual:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            return x + self.attn(self.attn_norm(x), step, cache) + self.mlp(self.mlp_norm(x))
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), step, cache)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, step, cache))
        return self.mlp_norm(x + self.mlp(x))


def rope_inv_freq(arch: Arch) -> tuple[torch.Tensor, float]:
    params = dict(getattr(arch.hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(arch.hf_config, "rope_theta", 10000.0))
        dim = arch.rotary_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from conveyor.inference.model.config_cache import pretrained

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](pretrained(arch.hf_config), "cpu")
    return inv_freq.float(), float(scaling)


@dataclasses.dataclass
class Packed:
    """A prefill's prompts packed in one row (StageModel._pack)."""

    index: torch.Tensor  # [T] the real tokens' places in the pass's [n * S]
    positions: torch.Tensor  # [1, T]
    lanes: torch.Tensor  # [T]
    cu_seqlens: torch.Tensor  # [n + 1] int32


class StageModel(nn.Module):
    """The layers ``layer_ids`` of a model (global indices), plus embeddings if first, head if last."""

    def __init__(self, arch: Arch, layer_ids: range, first: bool, last: bool):
        super().__init__()
        self.arch, self.layer_ids, self.first, self.last = arch, layer_ids, first, last
        if first:
            self.embed = nn.Embedding(arch.vocab_size, arch.word_dim)
            if arch.positions == "learned":
                self.pos_embed = nn.Embedding(arch.max_positions + arch.position_offset, arch.hidden)
            if arch.word_dim != arch.hidden:
                self.project_in = nn.Linear(arch.word_dim, arch.hidden, bias=False)
            if arch.type_vocab_size:
                self.type_embed = nn.Embedding(arch.type_vocab_size, arch.hidden)
                self.embed_norm = Norm(arch, arch.hidden)
        self.layers = nn.ModuleList(Block(arch) for _ in layer_ids)
        if last and arch.causal:
            if arch.final_norm:
                self.final_norm = Norm(arch, arch.hidden)
            if arch.word_dim != arch.hidden:
                self.project_out = nn.Linear(arch.hidden, arch.word_dim, bias=False)
            self.lm_head = nn.Linear(arch.word_dim, arch.vocab_size, bias=False)
        self.cache: KVCache | None = None
        self.compute_dtype = torch.float32  # of the activations, set by setup_cache (the cache may be float8)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        self.decode_kernel: DecodeKernel | None = None
        # Set from outside (kernels/packed_attention.py): eager prefills of several prompts then run
        # only the prompts' tokens, packed in one row, not their padding.
        self.packed_attention: PackedAttention | None = None

    def setup_cache(
        self,
        lanes: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """Preallocate the KV cache (``lanes`` x ``max_len`` + a scratch slot, stored in ``kv_dtype``,
        default ``dtype``) and the rotary tables."""
        a = self.arch
        self.compute_dtype = dtype
        shape = (len(self.layers), lanes, a.kv_heads, max_len, a.head_dim, kv_dtype or dtype)
        if device.type == "cuda":
            self.cache = None  # (a cache set up before is freed before the new one is measured)
            torch.cuda.empty_cache()
            refuse_if_too_large(*shape, free_bytes=torch.cuda.mem_get_info(device)[0])
        self.cache = KVCache(*shape, device)
        self.key_positions = torch.arange(self.cache.length, device=device)
        if a.positions == "rotary":
            inv_freq, scaling = rope_inv_freq(a)
            freqs = torch.outer(torch.arange(self.cache.length, dtype=torch.float), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # [L, rotary_dim]
            self.rope_cos = (emb.cos() * scaling).to(device)
            self.rope_sin = (emb.sin() * scaling).to(device)

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        a = self.arch
        x = self.embed(tokens)
        if a.word_dim != a.hidden:
            x = self.project_in(x)
        if a.positions == "learned":
            # Inactive lanes sit at the scratch position, past the table: clamp (their output is unused).
            x = x + self.pos_embed(positions.clamp(max=a.max_positions - 1) + a.position_offset)
        if a.type_vocab_size:
            x = self.embed_norm(x + self.type_embed.weight[0])
        return x

    def forward(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        lane_start: int = 0,
        prefill: bool = False,
        kv_len: int | None = None,
        lanes: torch.Tensor | None = None,
        run_layer: RunLayer | None = None,
        all_positions: bool = False,
    ) -> torch.Tensor:
        """inputs: tokens [n, S] (first stage) or hidden [n, S, hidden]; positions: [n, S] per token.

        Uses cache lanes ``lanes`` [n] (any lanes, as device data: one compiled or captured step serves
        every micro-batch), or [lane_start, lane_start + n). ``prefill``: each lane's prompt from
        position 0 (a whole prompt into an empty lane), so attention needs no cache reads and no mask.
        A pass of several tokens may be right-padded with tokens at the cache's scratch position: they
        write only the scratch slot, and the logits are each lane's last real token's. ``kv_len``: the
        cache slots attention reads, more than every position (default: all). Returns hidden
        [n, S, hidden], or on the last stage float32 logits of each lane's last token [n, vocab]
        (``all_positions``: of every token [n, S, vocab], as an HF forward returns them).
        """
        assert self.cache is not None, "call setup_cache() first"
        x = self._embed(inputs, positions) if self.first else inputs
        n, s = positions.shape
        if lanes is None:
            self.cache.check_lanes(lane_start, n)
            lanes = torch.arange(n, device=positions.device) + lane_start
        kv_len = self.cache.length if kv_len is None else kv_len
        window = self.arch.sliding_window
        packed = None
        if (
            prefill
            and n > 1
            and run_layer is None
            and not all_positions
            and self.packed_attention is not None
            and not torch.compiler.is_compiling()
            and (window is None or s <= window)
        ):
            packed = self._pack(positions, lanes)
        if packed is not None:
            x = x.reshape(n * s, -1)[packed.index][None]  # [1, T, hidden]
            positions, lanes = packed.positions, packed.lanes
        mask = None
        if not prefill or (window is not None and s > window):
            # mask [n, 1, S, kv_len]: a token sees cache slots at or before its position (and in the window)
            key_pos = self.key_positions[None, None, None, :kv_len]
            query_pos = positions[:, None, :, None]
            mask = key_pos <= query_pos
            if window is not None:
                mask = mask & (key_pos > query_pos - window)
        rope = None
        if self.rope_cos is not None and self.rope_sin is not None:
            cos = self.rope_cos[positions].unsqueeze(1).to(x.dtype)  # [n, 1, S, rotary_dim]
            sin = self.rope_sin[positions].unsqueeze(1).to(x.dtype)
            rope = (cos, sin)
        step = Step(positions, lanes[:, None], kv_len, mask, rope, self.decode_kernel)  # lanes [n, 1]
        if packed is not None:
            step.lanes, step.cu_seqlens, step.longest = lanes[None], packed.cu_seqlens, s  # lanes [1, T]
            step.packed_attention = self.packed_attention
        for i, layer in enumerate(self.layers):
            cache = self.cache.layer(i)
            x = layer(x, step, cache) if run_layer is None else run_layer(layer, x, step, cache)  # type: ignore[arg-type]
        if packed is not None:
            if self.last:  # each prompt's last token
                return self.head(x[0, packed.cu_seqlens[1:].long() - 1])
            padded = x.new_zeros(n * s, x.shape[-1])  # the next stage's input: the pass's own shape
            padded[packed.index] = x[0]
            return padded.view(n, s, -1)
        if not self.last:
            return x
        if all_positions:
            return self.head(x)
        if s > 1:  # each lane's last real token (the padding sits at the scratch position)
            last = (positions < self.cache.scratch_position).sum(dim=1) - 1  # [n]
            return self.head(x[torch.arange(n, device=x.device), last])
        return self.head(x[:, -1])

    def _pack(self, positions: torch.Tensor, lanes: torch.Tensor) -> Packed | None:
        """Where a prefill's real tokens lie (prompts are right-padded with tokens at the scratch
        position), and their positions and lanes, one per token; None where a row is all padding (a
        warm-up's pass). Finding them costs two syncs."""
        assert self.cache is not None
        n, s = positions.shape
        real = positions < self.cache.scratch_position
        lengths = real.sum(dim=1)
        if not bool(lengths.min() > 0):
            return None
        index = real.reshape(-1).nonzero().squeeze(1)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        token_lanes = lanes.reshape(n, 1).expand(n, s).reshape(-1)[index]
        return Packed(index, positions.reshape(-1)[index][None], token_lanes, cu_seqlens)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch.final_norm:
            x = self.final_norm(x)
        if self.arch.word_dim != self.arch.hidden:
            x = self.project_out(x)
        return self.lm_head(x).float()

    def encode(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder forward (BERT): tokens, attention_mask [n, S] -> last hidden state [n, S, hidden]."""
        n, s = tokens.shape
        positions = torch.arange(s, device=tokens.device).expand(n, s)
        x = self._embed(tokens, positions)
        mask = attention_mask.bool()[:, None, None, :]  # [n, 1, 1, S]: padding keys hidden
        step = Step(positions, positions[:, :1], s, mask, None)
        for layer in self.layers:
            x = layer(x, step, None)
        return x
