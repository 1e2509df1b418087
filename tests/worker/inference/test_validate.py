"""Pre-flight of a batch inference job (inference/validate.py): every bad input, model, layout or output
is refused in one line that names the file and line or the field, before any rank starts; `conveyor run`
and `conveyor worker` exit 2 and print no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conveyor.env import pod_environ
from conveyor.inference.validate import InputError, preflight
from conveyor.spec import PipelineJobSpec, parse_spec
from conveyor.testing.tiny import save_tiny

from tests.conftest import conveyor_cmd, subprocess_env

GOOD = [{"id": 0, "input_ids": [5, 9, 11]}, {"id": "a", "prompt": "the quick brown fox"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama")  # 3 layers, 4 heads, 256 positions


def spec_dict(tmp: Path, model: Path, **parallelism: int) -> dict:
    return {
        "mode": "inference",
        "device": "cpu",
        "model": {"path": str(model), "dtype": "float32"},
        "parallelism": {"stages": 2, **parallelism},
        "inference": {"input": str(tmp / "in.jsonl"), "output": str(tmp / "out" / "out.jsonl")},
    }


def write_lines(tmp: Path, rows: list) -> None:
    (tmp / "in.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def copy_model(tmp: Path, model: Path) -> Path:
    copy = tmp / "model"
    shutil.copytree(model, copy)
    return copy


# Each case: (name, how to spoil a good job in tmp, what the one-line refusal must say). A case gets
# (tmp, spec dict, model dir) and returns the spec dict to check.
Spoil = Callable[[Path, dict, Path], dict]


def lines(*rows: object) -> Spoil:
    def spoil(tmp: Path, spec: dict, model: Path) -> dict:
        write_lines(tmp, list(rows))
        return spec

    return spoil


def bytes_input(data: bytes) -> Spoil:
    def spoil(tmp: Path, spec: dict, model: Path) -> dict:
        (tmp / "in.jsonl").write_bytes(data)
        return spec

    return spoil


def model_edit(edit: Callable[[Path], None]) -> Spoil:
    def spoil(tmp: Path, spec: dict, model: Path) -> dict:
        copy = copy_model(tmp, model)
        edit(copy)
        spec["model"]["path"] = str(copy)
        return spec

    return spoil


def parallel(**kw: int) -> Spoil:
    def spoil(tmp: Path, spec: dict, model: Path) -> dict:
        spec["parallelism"].update(kw)
        return spec

    return spoil


def output_under_a_file(tmp: Path, spec: dict, model: Path) -> dict:
    (tmp / "afile").write_text("x")
    spec["inference"]["output"] = str(tmp / "afile" / "out.jsonl")
    return spec


def truncate_weights(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def index_naming_a_missing_file(d: Path) -> None:
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    names = ["model.embed_tokens.weight", "lm_head.weight"]
    weight_map = {n: f"model-0000{i + 1}-of-00002.safetensors" for i, n in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def wrong_shape(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def add_normalizer(normalizer: dict) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        tokenizer = json.loads((d / "tokenizer.json").read_text())
        (d / "tokenizer.json").write_text(json.dumps({**tokenizer, "normalizer": normalizer}))

    return edit


def set_config(**kw: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **kw}))

    return edit


CASES: list[tuple[str, Spoil, str]] = [
    ("malformed JSON line", lines(GOOD[0], '{"id": 1, "input_ids": [1, 2'), "in.jsonl:2: not JSON"),
    ("not an object", lines(GOOD[0], "[1, 2]"), "in.jsonl:2: a JSON list, not an object"),
    ("duplicate id", lines(GOOD[0], {"id": 0, "input_ids": [1]}), "in.jsonl:2: duplicate id 0"),
    ("missing id", lines(GOOD[0], {"input_ids": [1]}), 'in.jsonl:2: missing "id"'),
    ("float id", lines({"id": 1.5, "input_ids": [1]}), 'in.jsonl:1: "id" is 1.5'),
    ("empty input", lines(), "in.jsonl: no prompts"),
    ("blank lines only", bytes_input(b"\n  \n"), "in.jsonl: no prompts"),
    ("neither prompt nor ids", lines({"id": 1}), 'in.jsonl:1: give exactly one of "prompt"'),
    (
        "prompt too long (ids)",
        lines(GOOD[0], {"id": "long", "input_ids": [7] * 256}),
        'prompt "long" has 256 tokens',
    ),
    ("prompt too long (text)", lines({"id": "t", "prompt": "fox " * 300}), 'in.jsonl:1: prompt "t" has'),
    (  # 120 bytes of text, 1,320 tokens: NFKC makes each U+FDFA 18 characters (it passed, refused by the ranks)
        "prompt too long once normalized",
        lambda tmp, spec, model: lines(GOOD[1], {"id": "n", "prompt": "\ufdfa" * 40})(
            tmp, model_edit(add_normalizer({"type": "NFKC"}))(tmp, spec, model), model
        ),
        'in.jsonl:2: prompt "n" has 1320 tokens',
    ),
    ("negative token id", lines({"id": 1, "input_ids": [3, -1]}), '"input_ids"[1] is -1, outside'),
    ("token id past vocab", lines({"id": 1, "input_ids": [320]}), '"input_ids"[0] is 320, outside'),
    ("float token id", lines({"id": 1, "input_ids": [2.7]}), '"input_ids"[0] is 2.7; token ids are integers'),
    ("string token id", lines({"id": 1, "input_ids": ["5"]}), '"input_ids"[0] is "5"'),
    ("empty input_ids", lines({"id": 1, "input_ids": []}), '"input_ids" must be a non-empty list'),
    ("prompt not a string", lines({"id": 1, "prompt": ["a"]}), '"prompt" is a JSON list'),
    ("empty prompt", lines({"id": 1, "prompt": ""}), '"prompt" is empty'),
    (
        "max_new_tokens 0",
        lines({"id": 1, "prompt": "a", "max_new_tokens": 0}),
        '"max_new_tokens" is 0; give a',
    ),
    (
        "max_new_tokens text",
        lines({"id": 1, "input_ids": [3], "max_new_tokens": "8"}),
        '"max_new_tokens" is "8"',
    ),
    (
        "max_new_tokens above the spec's",
        lines({"id": 1, "input_ids": [3], "max_new_tokens": 200}),
        '"max_new_tokens" is 200, more than spec.inference.maxNewTokens (128)',
    ),
    (
        "max_new_tokens bool",
        lines({"id": 1, "input_ids": [3], "max_new_tokens": True}),
        '"max_new_tokens" is true',
    ),
    (
        "not UTF-8",
        bytes_input(b'{"id": 1, "prompt": "caf\xe9"}\n'),
        "in.jsonl:1: byte 25 of the line is not UTF-8",
    ),
    (  # valid UTF-8 bytes, but a JSON escape of half a UTF-16 pair: no text can be encoded from it
        "unpaired surrogate in a prompt",
        bytes_input(b'{"id": 1, "prompt": "caf\\ud83d"}\n'),
        'in.jsonl:1: "prompt" holds an unpaired surrogate \\ud83d at character 4',
    ),
    (  # (it passed, and every restart of the job failed at its first result)
        "unpaired surrogate in an id",
        bytes_input(b'{"id": "a\\udc00", "input_ids": [3]}\n'),
        'in.jsonl:1: "id" holds an unpaired surrogate \\udc00 at character 2',
    ),
    (  # (Notepad's "UTF-8"; json's own message said to "decode using utf-8-sig")
        "byte-order mark",
        bytes_input(b'\xef\xbb\xbf{"id": 1, "input_ids": [3]}\n'),
        "in.jsonl:1: the file starts with a UTF-8 byte-order mark: save it as UTF-8 without one",
    ),
    (
        "huge line",
        bytes_input(b'{"id": 1, "prompt": "' + b"x" * (3 << 20) + b'"}\n'),
        "in.jsonl:1: line longer than",
    ),
    ("no config.json", model_edit(lambda d: (d / "config.json").unlink()), "config.json not found"),
    ("config not JSON", model_edit(lambda d: (d / "config.json").write_text("{")), "config.json: Expecting"),
    ("unknown model_type", model_edit(set_config(model_type="mamba9")), "model family 'mamba9'"),
    ("truncated safetensors", model_edit(truncate_weights), "model.safetensors: truncated"),
    (
        "no weights",
        model_edit(lambda d: (d / "model.safetensors").unlink()),
        "no *.safetensors in",
    ),
    (
        "index names a missing file",
        model_edit(index_naming_a_missing_file),
        "model-00002-of-00002.safetensors",
    ),
    (
        "tensor of the wrong shape",
        model_edit(wrong_shape),
        "model.norm.weight has shape [31], config implies [32]",
    ),
    (
        "text prompt, no tokenizer",
        model_edit(lambda d: (d / "tokenizer.json").unlink() or (d / "tokenizer_config.json").unlink()),
        'a text "prompt" needs a tokenizer',
    ),
    (
        "more stages than layers",
        parallel(stages=4),
        "spec.parallelism.stages: 4 pipeline stages but the model has only 3",
    ),
    (
        "TP does not divide heads",
        parallel(tensorParallel=3),
        "num_attention_heads 4 is not divisible by tensorParallel 3",
    ),
    ("output under a file", output_under_a_file, "afile is a file"),
]


@pytest.mark.parametrize("spoil, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(model: Path, tmp_path: Path, spoil: Spoil, message: str) -> None:
    write_lines(tmp_path, GOOD)
    spec = parse_spec(spoil(tmp_path, spec_dict(tmp_path, model), model))
    started = time.monotonic()
    with pytest.raises(InputError) as err:
        preflight(spec)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert time.monotonic() - started < 10  # the 3 MB line is refused without tokenizing it
    assert not (tmp_path / "out" / "out.jsonl").exists()


def test_good_input_passes(model: Path, tmp_path: Path) -> None:
    write_lines(tmp_path, [*GOOD, "", {"id": 2, "input_ids": [7] * 255, "max_new_tokens": 1}])  # 255 + 1 fit
    preflight(parse_spec(spec_dict(tmp_path, model)))


def test_an_encoder_is_refused_before_any_rank_loads_it(tmp_path: Path) -> None:
    """A batch job on a BERT passed the pre-flight, then every rank loaded it and failed at its first
    token ('StageModel' object has no attribute 'lm_head'), restarted backoffLimit times."""
    write_lines(tmp_path, GOOD)
    bert = save_tiny("bert", tmp_path / "bert")
    with pytest.raises(InputError, match=r"^spec.model.path: .* is a bert model, an encoder, .* \(llama"):
        preflight(parse_spec(spec_dict(tmp_path, bert)))


def serve_spec(model: Path) -> dict:
    return {
        "mode": "serve",
        "device": "cpu",
        "model": {"path": str(model), "dtype": "float32"},
        "parallelism": {"stages": 2},
        "serve": {"port": 8000},
    }


def test_a_serve_job_is_checked_before_its_ranks_start(model: Path, tmp_path: Path) -> None:
    """A serve job had no pre-flight: an encoder, a damaged model or a missing tokenizer were found by
    every rank after it started (the entry rank's log; a restart each time)."""
    from conveyor.inference.validate import needs_preflight

    assert needs_preflight(parse_spec(serve_spec(model)))
    preflight(parse_spec(serve_spec(model)))
    bert = save_tiny("bert", tmp_path / "bert")
    with pytest.raises(InputError, match=r"^spec.model.path: .* is a bert model, an encoder"):
        preflight(parse_spec(serve_spec(bert)))
    bare = save_tiny("llama", tmp_path / "bare", tokenizer=False)
    with pytest.raises(InputError, match=r"^spec.model.path: .* has no tokenizer, which serve mode needs"):
        preflight(parse_spec(serve_spec(bare)))
    damaged = copy_model(tmp_path, model)
    weights = next(damaged.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError):
        preflight(parse_spec(serve_spec(damaged)))


def test_the_checks_of_a_warm_start_import_neither_torch_nor_transformers(
    model: Path, tmp_path: Path
) -> None:
    """The launcher's pre-flight reads headers and the kept config and tokenizer: on a warm start it
    imports neither torch nor transformers (seconds each, on the critical path of a cold one)."""
    write_lines(tmp_path, GOOD)
    spec = spec_dict(tmp_path, model)
    cache = tmp_path / "cache"
    code = f"""
import json, sys
from pathlib import Path
from conveyor.inference.validate import preflight
from conveyor.spec import parse_spec
preflight(parse_spec(json.loads({json.dumps(json.dumps(spec))})), cache_dir=Path({str(cache)!r}))
print(sorted(m for m in ("torch", "transformers", "safetensors") if m in sys.modules))
"""
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, check=True
        )
        for _ in range(2)  # the first keeps the config and the tokenizer in the cache
    ]
    assert "transformers" in runs[0].stdout
    assert runs[1].stdout.strip() == "[]"


def _job_file(tmp: Path, spec: dict) -> Path:
    doc = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": "v"},
        "spec": spec,
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.integration
@pytest.mark.parametrize("case", ["float token id", "truncated safetensors", "TP does not divide heads"])
def test_conveyor_run_refuses_with_exit_2_and_no_traceback(model: Path, tmp_path: Path, case: str) -> None:
    _, spoil, message = next(c for c in CASES if c[0] == case)
    write_lines(tmp_path, GOOD)
    job = _job_file(tmp_path, spoil(tmp_path, spec_dict(tmp_path, model), model))
    result = subprocess.run(
        conveyor_cmd("run", str(job)), env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    refusals = [line for line in result.stderr.splitlines() if "refused" in line]
    assert len(refusals) == 1 and message in refusals[0], result.stderr
    # the ranks started meanwhile (preflight_gate.py) but went no further than the gate: they read
    # neither the model's config nor the input, and wrote nothing
    assert "inference starting" not in result.stdout + result.stderr
    assert not list(tmp_path.rglob("out.jsonl*"))


@pytest.mark.integration
def test_conveyor_run_refuses_yaml_that_is_not_utf8(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_bytes(b"apiVersion: conveyor.dev/v1alpha1\nkind: PipelineJob\nmetadata: {name: caf\xe9}\n")
    result = subprocess.run(
        conveyor_cmd("run", str(job)), env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "byte 73 is not UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_conveyor_worker_refuses_before_its_ranks_read_anything(model: Path, tmp_path: Path) -> None:
    write_lines(tmp_path, [{"id": 1, "input_ids": [3, -1]}])
    spec: PipelineJobSpec = parse_spec(spec_dict(tmp_path, model))
    env = pod_environ(job="v", spec=spec, replica=0, stage=0, master_addr="127.0.0.1", master_port=1)
    term = tmp_path / "termination"
    result = subprocess.run(
        conveyor_cmd("worker"),
        env=subprocess_env(**env, CONVEYOR_TERMINATION_LOG=str(term), CONVEYOR_LOG_FORMAT="text"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    # its rank started meanwhile and was stopped at the gate, having read and written nothing
    assert "inference starting" not in result.stderr and not list(tmp_path.rglob("out.jsonl*"))
    message = json.loads(term.read_text())
    assert message["completed"] is False and '"input_ids"[1] is -1' in message["cause"]
