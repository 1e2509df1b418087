"""``conveyor generate`` refuses bad flags, a damaged model directory and unusable prompts in its own
process, once, naming the flag and the fix, before any rank starts (generate_preflight.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conveyor.cli import _parser
from conveyor.inference.generate_preflight import preflight_generate
from conveyor.inference.validate import InputError
from conveyor.testing.tiny import save_tiny

from tests.worker.inference.generation import conveyor_generate


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama")  # 3 layers, 256 positions


def _preflight(model: Path, *flags: str, prompt: str = "hello world") -> None:
    args = _parser().parse_args(["generate", "--model", str(model), "--prompt", prompt, *flags])
    preflight_generate(args, cache_dir=None)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--stages", "0"), "--stages must be >= 1"),
        (("--stages", "-1"), "--stages must be >= 1"),
        (("--stages", "4"), "--stages: 4 pipeline stages but the model has only 3 layers"),
        (("--tensor-parallel", "0"), "--tensor-parallel must be >= 1"),
        (("--tensor-parallel", "3"), "--tensor-parallel: llama model cannot be split 3 ways"),
        (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
        (("--max-new-tokens", "-5"), "--max-new-tokens must be >= 1"),
        (("--temperature", "-1"), "--temperature must be >= 0"),
        (("--top-k", "-1"), "--top-k must be >= 0"),
        (("--top-p", "0"), "--top-p must be in (0, 1]"),
        (("--top-p", "1.5"), "--top-p must be in (0, 1]"),
    ],
)
def test_a_flag_out_of_range_is_refused_by_name(model: Path, flags: tuple[str, ...], named: str) -> None:
    with pytest.raises(InputError, match=r"^" + named.replace("(", r"\(").replace("]", r"\]")):
        _preflight(model, *flags)


def test_good_flags_pass(model: Path) -> None:
    _preflight(model, "--stages", "3", "--tensor-parallel", "2", "--max-new-tokens", "1", "--top-p", "1")


def test_an_empty_prompt_and_one_longer_than_the_model_are_refused(model: Path) -> None:
    with pytest.raises(InputError, match=r"--prompt 1 \(''\) tokenizes to nothing"):
        _preflight(model, prompt="")
    with pytest.raises(InputError, match=r"--prompt 1 has \d+ tokens; the model has 256 positions"):
        _preflight(model, prompt="hello world " * 300)


def test_a_prompt_that_is_not_utf8_is_refused(model: Path) -> None:
    """A Latin-1 terminal's ``café``: Python hands the byte 0xe9 over as a lone surrogate, which the
    tokenizer rejects with "TextInputSequence must be str" (before: a traceback in every rank)."""
    with pytest.raises(InputError, match=r"--prompt 1: character 4 is not UTF-8 \(byte 0xe9\)"):
        _preflight(model, prompt=b"caf\xe9".decode("utf-8", "surrogateescape"))


def test_more_ranks_than_gpus_is_refused(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with one GPU, ``--tensor-parallel 2`` (device auto or cuda) would put both ranks on
    it, which NCCL refuses inside each rank; --device cpu runs them on the CPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("auto", "cuda"):
        with pytest.raises(InputError, match=r"= 2 ranks, one GPU each, but this machine has 1"):
            _preflight(model, "--tensor-parallel", "2", "--device", device)
    _preflight(model, "--tensor-parallel", "2", "--device", "cpu")
    _preflight(model, "--device", "cuda")


def test_cuda_without_a_gpu_is_refused(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=r"^--device cuda: CUDA is not available"):
        _preflight(model, "--device", "cuda")


def test_an_encoder_is_refused(tmp_path: Path) -> None:
    """Before: BERT passed the family check, and every rank loaded it, then died on ``lm_head``."""
    bert = save_tiny("bert", tmp_path / "bert")
    with pytest.raises(InputError, match=r"^--model: .* is a bert model, an encoder.*causal family \(llama"):
        _preflight(bert)


def test_a_damaged_model_directory_is_refused(model: Path, tmp_path: Path) -> None:
    truncated = Path(shutil.copytree(model, tmp_path / "truncated"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(InputError, match=r"model.safetensors: truncated"):
        _preflight(truncated)
    no_tokenizer = Path(shutil.copytree(model, tmp_path / "no_tokenizer"))
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(InputError, match=r"^--model: .* has no tokenizer"):
        _preflight(no_tokenizer)
    with pytest.raises(InputError, match=r"^--model: .* is not a directory"):
        _preflight(tmp_path / "missing")


def test_the_command_prints_the_refusal_once_and_starts_no_rank(model: Path, tmp_path: Path) -> None:
    """Before: every rank started, loaded, and printed a traceback of the safetensors error (exit 1);
    ``--stages 0`` started no rank and exited 0 having answered nothing."""
    truncated = Path(shutil.copytree(model, tmp_path / "truncated"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    proc = conveyor_generate(truncated, ["hi"], "--tensor-parallel", "2", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("model.safetensors: truncated") == 1 and "starting" not in proc.stderr, (
        proc.stderr[-3000:]
    )
    proc = conveyor_generate(model, ["hi"], "--stages", "0", timeout=120)
    assert proc.returncode == 2 and "--stages must be >= 1" in proc.stderr, proc.stderr[-3000:]
