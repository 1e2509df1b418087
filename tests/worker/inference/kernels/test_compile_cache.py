"""The persistent compile cache's tile choices (compile_cache.TileChoices) and the rank builder's start-up
phases, on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conveyor.inference.kernels import compile_cache, skinny_matmul
from conveyor.inference.kernels.cuda_graphs import EAGER, CompiledStage
from conveyor.inference.rank_builder import PromptTooLongError, build_generation_rank, cache_length
from conveyor.inference.run_progress import RunProgress
from conveyor.testing.tiny import save_tiny
from conveyor.topology import Layout, Topology

from tests.conftest import subprocess_env

BF16 = torch.bfloat16


@pytest.fixture
def choices() -> dict:  # type: ignore[type-arg]
    saved = dict(skinny_matmul._CHOICES)
    skinny_matmul._CHOICES.clear()
    yield skinny_matmul._CHOICES
    skinny_matmul._CHOICES.clear()
    skinny_matmul._CHOICES.update(saved)


def test_tile_choices_saved_by_one_device_are_found_by_another_rank(tmp_path: Path, choices: dict) -> None:  # type: ignore[type-arg]
    """A tensor-parallel rank on cuda:1 (or a second replica) reads what cuda:0 measured: the file names
    the GPU model and versions, its rows the shape and dtype, and no device index."""
    tiles = skinny_matmul.Tiles(32, 256, stages=3, splits=2)
    choices[(4096, 4096, 16, BF16, BF16, 0, False)] = tiles
    choices[(22016, 4096, 16, BF16, BF16, 0, True)] = None  # cuBLAS won
    choices[(11008, 4096, 16, BF16, BF16, 3, False)] = tiles  # another device's: not this rank's to save
    compile_cache.TileChoices(tmp_path, "NVIDIA H200", 0, "3.6.0").save()
    choices.clear()
    loaded = compile_cache.TileChoices(tmp_path, "NVIDIA H200", 1, "3.6.0").load()
    assert loaded == 2
    assert choices == {
        (4096, 4096, 16, BF16, BF16, 1, False): tiles,
        (22016, 4096, 16, BF16, BF16, 1, True): None,
    }
    # another GPU model or Triton version: its own file, nothing loaded
    assert compile_cache.TileChoices(tmp_path, "NVIDIA H100", 0, "3.6.0").load() == 0
    assert compile_cache.TileChoices(tmp_path, "NVIDIA H200", 0, "3.7.0").load() == 0


def test_tile_choices_merge_with_what_another_replica_saved(tmp_path: Path, choices: dict) -> None:  # type: ignore[type-arg]
    first, second = skinny_matmul.Tiles(8, 256), skinny_matmul.Tiles(16, 512)
    choices[(4096, 4096, 1, BF16, BF16, 0, False)] = first
    compile_cache.TileChoices(tmp_path, "gpu", 0).save()
    choices.clear()
    choices[(4096, 11008, 1, BF16, BF16, 0, False)] = second
    compile_cache.TileChoices(tmp_path, "gpu", 0).save()
    choices.clear()
    assert compile_cache.TileChoices(tmp_path, "gpu", 0).load() == 2
    assert choices[(4096, 4096, 1, BF16, BF16, 0, False)] == first
    assert choices[(4096, 11008, 1, BF16, BF16, 0, False)] == second


def test_an_unreadable_tile_file_is_measured_again_not_trusted(tmp_path: Path, choices: dict) -> None:  # type: ignore[type-arg]
    cache = compile_cache.TileChoices(tmp_path, "gpu", 0)
    cache.path.write_text('{"choices": [{"n": 1')  # a writer that died mid-file (before atomic writes)
    assert cache.load() == 0 and not choices


def test_the_rank_builder_times_each_phase_and_attaches_the_warm_stage(tmp_path: Path) -> None:
    model_dir = save_tiny("llama", tmp_path, tokenizer=False)
    seen: list[str] = []
    rank = build_generation_rank(
        str(model_dir),
        Topology(Layout()),
        dtype=torch.float32,
        device=torch.device("cpu"),
        micro_batches=2,
        lanes_per_micro_batch=3,
        max_len=20,
        options=EAGER,
        on_phase=lambda name, seconds: seen.append(name),
    )
    assert set(rank.seconds) == {"setup", "load", "tune", "compile"}
    assert set(seen) == set(rank.seconds) and all(v >= 0 for v in rank.seconds.values())
    assert rank.model.cache is not None and rank.model.cache.lanes_total == 6
    assert CompiledStage.of(rank.model) is rank.compiled and rank.compiled.warm


def test_cache_length_refuses_a_prompt_with_no_room_for_a_token() -> None:
    assert cache_length(100, 50, 512) == 150
    assert cache_length(500, 50, 512) == 512  # new tokens capped by the model's positions
    with pytest.raises(
        PromptTooLongError, match="a prompt of 512 tokens does not fit the model's 512 positions"
    ):
        cache_length(512, 1, 512)


def test_progress_lines_report_rate_and_time_left_of_this_run() -> None:
    now = [0.0]
    progress = RunProgress(total=10, completed=4, every=5.0, clock=lambda: now[0])  # 4 done before a restart
    now[0] = 1.0
    assert progress.result(100) is None  # not due yet
    now[0] = 6.0
    line = progress.result(200)
    assert line == {
        "completed": 6,
        "total": 10,
        "percent": 60.0,
        "tokens_per_second": 50.0,  # 300 tokens in 6 s
        "prompts_per_second": 0.33,
        "eta_seconds": 12.0,  # 3 s a prompt this run, 4 left
    }
    for _ in range(3):
        now[0] += 0.1
        progress.result(1)
    assert progress.result(1) is not None  # the last result always reports


PREPARE = """
import os, sys
from pathlib import Path
from conveyor.inference.kernels.cuda_graphs import EAGER, CompileOptions
from conveyor.inference.rank_builder import prepare_compiler

prepare_compiler(EAGER, Path(sys.argv[1]))
eager = "torch._inductor.compile_fx" in sys.modules, "TORCHINDUCTOR_CACHE_DIR" in os.environ
prepare_compiler(CompileOptions(triton_kernels=False), Path(sys.argv[1]))
import torch._inductor.config as inductor
print(eager, "torch._inductor.compile_fx" in sys.modules, os.environ["TORCHINDUCTOR_CACHE_DIR"],
      inductor.fx_graph_cache, inductor.compile_threads)
"""


def test_the_compiler_is_readied_before_the_model_and_eager_readies_nothing(tmp_path: Path) -> None:
    # a batch job's rank does this at the pre-flight gate (job.py): it must need nothing of the job
    # inductor's compile workers: not started for this check, but sized for a pod of more ranks than CPUs
    env = subprocess_env(TORCH_WARM_POOL="0", LOCAL_WORLD_SIZE="100000")
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_COMPILE_THREADS"):
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", PREPARE, str(tmp_path / "cache")], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # (torch._dynamo's import writes inductor's default into the environment: not a setting of the user's)
    cache = str(tmp_path / "cache" / "inductor")
    assert out.stdout.split() == ["(False,", "False)", "True", cache, "True", "1"], out.stdout
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "users")  # the user's own settings win
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "3"
    out = subprocess.run(
        [sys.executable, "-c", PREPARE, str(tmp_path / "cache")], env=env, capture_output=True, text=True
    )
    assert out.stdout.split()[3:] == [str(tmp_path / "users"), "True", "3"], out.stderr[-3000:]


def test_a_ranks_compile_workers_fit_its_share_of_the_pods_cpu_limit(tmp_path: Path) -> None:
    import os

    host = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")  # no limit: the CPUs it may run on
    assert compile_cache.cpu_share({}, v2) == host
    (v2 / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs: 3 busy threads use them
    assert compile_cache.cpu_share({}, v2) == min(host, 3)
    assert compile_cache.cpu_share({"LOCAL_WORLD_SIZE": "8"}, v2) == 1  # 8 ranks share them: at least 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert compile_cache.cpu_share({"LOCAL_WORLD_SIZE": "1"}, v1) == host
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert compile_cache.cpu_share({}, v1) == 1
    assert compile_cache.cpu_share({}, tmp_path / "none") == host  # no cgroup files: the affinity


def test_a_batch_job_compiles_its_prompt_passes_only_where_that_pays_unless_told() -> None:
    from conveyor.inference.job import COMPILE_PROMPTS_FROM_TOKENS, compiling_prompts_pays
    from conveyor.inference.kernels.cuda_graphs import CompileOptions

    cuda = torch.device("cuda")  # (the options only; nothing runs on it)
    small, large = COMPILE_PROMPTS_FROM_TOKENS - 1, COMPILE_PROMPTS_FROM_TOKENS
    assert [compiling_prompts_pays(n) for n in (0, small, large)] == [False, False, True]
    for tokens, told, want in [
        (large, {}, True),
        (small, {}, False),
        (large, {"CONVEYOR_COMPILE_PROMPTS": "0"}, False),
        (small, {"CONVEYOR_COMPILE_PROMPTS": "1"}, True),
    ]:
        options = CompileOptions.from_env(cuda, told, compile_prompts=compiling_prompts_pays(tokens))
        assert options.compile_prompts is want, (tokens, told)
    assert not CompileOptions.from_env(torch.device("cpu"), {}, compile_prompts=True).compile_prompts
    # eager prefills are packed on a GPU unless told not to; never on the CPU
    assert CompileOptions.from_env(cuda, {}).pack_prompts
    assert not CompileOptions.from_env(cuda, {"CONVEYOR_PACK_PROMPTS": "0"}).pack_prompts
    assert not CompileOptions.from_env(torch.device("cpu"), {}).pack_prompts
    # SDPA's cuDNN backend stays out of prompt passes unless asked for
    assert not CompileOptions.from_env(cuda, {}).cudnn_attention
    assert CompileOptions.from_env(cuda, {"CONVEYOR_CUDNN_ATTENTION": "1"}).cudnn_attention
