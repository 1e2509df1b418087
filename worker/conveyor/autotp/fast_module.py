"""``engine.module`` under ``replace_with_kernel_inject=True``: our compact decoder (StageModel, static KV
cache, tensor-parallel all-reduce hooks) behind the two HF calls DeepSpeed users make on it.

    engine.module(input_ids, attention_mask=None)       -> an object with .logits [B, S, vocab]
    engine.module.generate(input_ids, max_new_tokens=16, do_sample=False, ...)  -> [B, S + new] tokens
    transformers.pipeline("text-generation", model=engine.module, tokenizer=...)  (calls generate)

``generate`` runs our generation loop (pipeline/generate.py, one stage, continuous batching over the
batch's rows); greedy tokens are HF's. Sampling (``do_sample=True`` with temperature, top_k, top_p,
repetition_penalty) draws with our counter-based sampler (sampling.py): the same distribution as HF's,
not HF's random stream. Every other generate option is refused by name before anything runs. Every rank
of the tensor-parallel group makes the same calls (the all-reduces pair them up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from conveyor.autotp.plan import AutoTPError
from conveyor.distributed import held_weakly
from conveyor.inference.model.stage_model import StageModel
from conveyor.inference.pipeline.generate import Request, Result, SchedulerHooks, run_generation
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.inference.pipeline.stage import PipelinePeers

# generate kwargs read here (input_ids and attention_mask besides)
SAMPLING_KWARGS = (
    "max_new_tokens",
    "max_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "eos_token_id",
    "pad_token_id",
)
# options accepted only at the value that changes nothing (HF's defaults)
NEUTRAL = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "min_new_tokens": 0,
    "min_length": 0,
    "use_cache": True,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "streamer": None,
}
# generation_config fields that describe the model, not a decoding option
METADATA = {"bos_token_id", "decoder_start_token_id", "transformers_version"}


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, S, vocab] float32


def _unsupported(options: dict[str, Any]) -> list[str]:
    return sorted(
        k
        for k, v in options.items()
        if v is not None and k not in SAMPLING_KWARGS and k not in METADATA and NEUTRAL.get(k, object()) != v
    )


# transformers 5's generate, given neither max_new_tokens nor max_length (by the call or the model's
# generation_config), adds 20 tokens, the whole at most config.max_position_embeddings
HF_DEFAULT_NEW_TOKENS = 20


def new_tokens(options: dict[str, Any], prompt_length: int, max_positions: int | None) -> int:
    """How many tokens HF's ``generate`` would add for these options: ``max_new_tokens`` (refused below 1,
    as HF refuses it), else up to ``max_length`` in all, else ``HF_DEFAULT_NEW_TOKENS``."""
    new = options.get("max_new_tokens")
    if new is not None:
        if int(new) < 1:
            raise ValueError(f"`max_new_tokens` must be greater than 0, but is {new}")
        return int(new)
    if options.get("max_length") is not None:
        return int(options["max_length"]) - prompt_length
    total = prompt_length + HF_DEFAULT_NEW_TOKENS
    return (total if max_positions is None else min(total, max_positions)) - prompt_length


class FastCausalLM(nn.Module):
    """This rank's StageModel (the whole depth, its tensor-parallel shard) with HF's call shapes."""

    def __init__(
        self,
        stage: StageModel,
        config: Any,
        generation_config: Any,
        *,
        max_out_tokens: int,
        tensor_group: Any,
        tensor_src: int,
        rank: int,
    ):
        super().__init__()
        self.stage = stage
        self.config = config
        self.generation_config = generation_config
        self.max_len = min(max_out_tokens, stage.arch.max_positions)
        self._tensor_group = held_weakly(tensor_group)  # not owned: see conveyor.distributed.held_weakly
        self._tensor_src = tensor_src
        self._rank = rank
        self.warmed: set[int] = set()  # batch sizes whose decode step is compiled and captured
        self.tiles: Any = None  # the tile choices of the Triton products (compile_cache.TileChoices)

    @property
    def peers(self) -> PipelinePeers:
        return PipelinePeers(
            0, 1, None, None, self._rank, self._rank, self._tensor_group(), self._tensor_src, None
        )

    @property
    def device(self) -> torch.device:
        return self.stage.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.stage.embed.weight.dtype

    def can_generate(self) -> bool:
        return True

    def _cache_for(self, lanes: int) -> None:
        cache = self.stage.cache
        if cache is None or cache.lanes_total < lanes:
            self.stage.setup_cache(lanes, self.max_len, self.dtype, self.device)
            self.warmed.clear()  # the graphs wrote the old cache

    def _warm_for(self, lanes: int) -> None:
        """On a GPU, the decode step as a job runs it (compiled layer, Triton products and attention,
        one CUDA graph) for a batch of ``lanes``, made before the first token of the first call with that
        batch size; the compile cache (~/.cache/conveyor/compile or CONVEYOR_COMPILE_CACHE) keeps it for
        the next process."""
        if self.device.type != "cuda" or lanes in self.warmed:
            return
        from conveyor.env import compile_cache_dir
        from conveyor.inference.kernels import compile_cache
        from conveyor.inference.kernels.cuda_graphs import CompiledStage, CompileOptions

        options = CompileOptions.from_env(self.device, compile_prompts=False)
        if not self.warmed:
            cache_dir = compile_cache_dir()
            compile_cache.configure(cache_dir)
            self.tiles = compile_cache.TileChoices.for_device(cache_dir, self.device)
            CompiledStage.attach(self.stage, options)
        CompiledStage.of(self.stage).warm_up(lanes, self.tiles if options.triton_kernels else None)
        self.warmed.add(lanes)

    def _check_length(self, tokens: int, what: str) -> None:
        if tokens > self.max_len:
            raise ValueError(
                f"{what} ({tokens} tokens) exceeds the KV cache of {self.max_len} positions "
                f"(max_out_tokens in init_inference, at most the model's {self.stage.arch.max_positions})"
            )

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> CausalLMOutput:
        """Logits of every position. Rows padded on either side through ``attention_mask`` are read as
        HF's ``generate`` reads them: each row's tokens from position 0 (HF's forward gives the same
        logits with ``position_ids=attention_mask.cumsum(-1) - 1``)."""
        neutral = {**NEUTRAL, "return_dict": True}
        bad = sorted(k for k, v in kwargs.items() if v is not None and neutral.get(k, object()) != v)
        if bad:
            raise AutoTPError(
                f"engine.module(...) under replace_with_kernel_inject=True takes input_ids and "
                f"attention_mask; not {', '.join(f'{k}={kwargs[k]!r}' for k in bad)} (use "
                "replace_with_kernel_inject=False for the HF module itself)"
            )
        n, s = input_ids.shape
        self._check_length(s, "the input")
        self._cache_for(n)
        ids = input_ids.to(self.device)
        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(s, device=self.device).expand(n, s)  # [n, S]
            logits = self.stage(ids, positions, prefill=True, all_positions=True)
        else:
            mask = attention_mask.to(self.device).bool()
            # real tokens at 0, 1, ... in their own row; padding at the scratch slot, which no real
            # token sees (its position is past theirs)
            positions = torch.where(mask, mask.long().cumsum(-1) - 1, self.max_len)  # [n, S]
            logits = self.stage(ids, positions, all_positions=True)
        return CausalLMOutput(logits=logits)

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        config = kwargs.pop("generation_config", None) or self.generation_config
        options = {k: v for k, v in (config.to_dict() if config is not None else {}).items() if v is not None}
        options = {k: v for k, v in options.items() if not k.startswith("_")}
        options.update({k: v for k, v in kwargs.items() if v is not None})
        bad = _unsupported(options)
        if bad:
            detail = ", ".join(f"{k}={options[k]!r}" for k in bad)
            raise AutoTPError(
                f"generate option(s) {detail} not supported under replace_with_kernel_inject=True "
                f"(supported: {', '.join(SAMPLING_KWARGS)}, and {', '.join(f'{k}={v!r}' for k, v in NEUTRAL.items())}); "
                "use replace_with_kernel_inject=False for HF's full generate"
            )
        return options

    @torch.inference_mode()
    def generate(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """HF's ``generate`` for greedy and sampled decoding: [B, S + new], rows that stopped at an end
        token padded with ``pad_token_id`` after it, as HF does."""
        if input_ids is None:
            raise AutoTPError("generate needs input_ids under replace_with_kernel_inject=True")
        o = self._options(dict(kwargs))
        n, s = input_ids.shape
        new = new_tokens(o, s, getattr(self.config, "max_position_embeddings", None))
        self._check_length(s + new, f"the input plus max_new_tokens ({s} + {new})")
        eos = o.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        pad = o.get("pad_token_id", eos_ids[0] if eos_ids else 0)
        sampled = bool(o.get("do_sample", False))
        params = SamplingParams(
            temperature=float(o.get("temperature", 1.0)) if sampled else 0.0,
            top_k=int(o.get("top_k", 50)) if sampled else 0,
            top_p=float(o.get("top_p", 1.0)) if sampled else 1.0,
            repetition_penalty=float(o.get("repetition_penalty", 1.0)),
            # a fresh draw per call, from torch's generator (as HF's sampling is): tp ranks agree anyway,
            # the scheduler broadcasts rank 0's tokens
            seed=int(torch.randint(0, 2**31 - 1, ()).item()) if sampled else 0,
            stop_token_ids=eos_ids,
        )
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = [input_ids[i][mask[i].bool()].tolist() for i in range(n)]
        outputs: dict[int, list[int]] = {}

        def keep(result: Result) -> None:
            outputs[int(result.id)] = result.output_ids

        self._cache_for(n)
        if new > 0:
            self._warm_for(n)
            run_generation(
                self.stage,
                self.peers,
                params,
                [Request(i, row, new) for i, row in enumerate(rows)],
                micro_batches=1,
                lanes_per_micro_batch=n,
                device=self.device,
                hooks=SchedulerHooks(on_result=keep),
            )
        width = max((len(v) for v in outputs.values()), default=0)
        out = torch.full((n, s + width), int(pad), dtype=input_ids.dtype, device=input_ids.device)
        out[:, :s] = input_ids
        for i, tokens in outputs.items():
            out[i, s : s + len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        return out
