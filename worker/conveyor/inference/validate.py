"""Pre-flight of a batch inference job: the input file, the model directory, the layout and the output,
checked in one process before any rank starts (``conveyor run`` and ``conveyor worker``); of a
fine-tuning job, the model directory and the layout.

Every refusal is one ``InputError`` line that names the file and line, or the spec field, and says the
fix; the entry points print it and exit 2. The input is streamed and a line's size is bounded before it
is parsed or tokenized, so a 50 MB line is refused at once instead of after minutes of tokenizing. The
ranks parse rows with the same ``parse_row``, so what passes here is what they run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.inference.model.families import Arch
    from conveyor.spec import PipelineJobSpec

ROW_FORM = (
    'each line is one JSON object: {"id": ..., "prompt": "text"} or {"id": ..., "input_ids": [ints]}, '
    'optionally with "max_new_tokens": n'
)
# Bytes per position a line may take: token ids as JSON ("12345, ") or text (a byte-level token is at
# least one byte; a long one rarely more than a few dozen). Past that the prompt cannot fit the model.
BYTES_PER_POSITION = 64
MIN_LINE_BYTES = 1 << 20
# A byte-level or byte-fallback tokenizer makes at most one token per byte of the text its normalizer
# gives (NFKC makes one character of 3 bytes up to 18), plus a few special tokens: a text whose
# normalized bytes are fewer than this margin below the positions need not be tokenized to know it fits.
SPECIAL_TOKENS_MARGIN = 8


class InputError(ValueError):
    """Bad input (file, model, layout or output): one line naming where and the fix; exit code 2."""


@dataclass(frozen=True)
class Row:
    id: Any  # str or int, as given
    key: str  # json.dumps(id): how ids are compared (1 and "1" differ)
    prompt: str | None
    input_ids: list[int] | None
    max_new_tokens: int | None = None  # this prompt's own limit (else spec.inference.maxNewTokens)


def line_limit(max_positions: int) -> int:
    return max(MIN_LINE_BYTES, BYTES_PER_POSITION * max_positions)


def input_lines(path: str | Path, limit: int) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines, streamed; refuses a line over ``limit`` bytes before
    reading the rest of it, and bytes that are not UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(limit + 1), b""), start=1):
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise InputError(
                    f"{path}:{number}: line longer than {limit} bytes, more than any prompt that fits the "
                    "model's positions: shorten or split it"
                )
            # (json's own refusal says to "decode using utf-8-sig": no fix for the file)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raise InputError(
                    f"{path}:1: the file starts with a UTF-8 byte-order mark: save it as UTF-8 without one"
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{path}:{number}: byte {err.start + 1} of the line is not UTF-8: save the file as UTF-8"
                ) from None
            if text.strip():
                yield number, text


def _check_unicode(where: str, field: str, value: str) -> None:
    """A JSON escape may name half of a UTF-16 pair (``"\\ud83d"``) in a file of valid UTF-8: such a string
    cannot be encoded, so a tokenizer or the sampler's hash of the id would fail inside a rank."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(
            f'{where}: "{field}" holds an unpaired surrogate \\u{ord(value[err.start]):04x} at character '
            f"{err.start + 1} (half of an escaped UTF-16 pair): give both halves or the character itself"
        ) from None


def parse_row(
    path: str | Path, number: int, text: str, vocab_size: int, max_new_tokens: int | None = None
) -> Row:
    """One line as a ``Row``; ``max_new_tokens``: the most a row may ask for (spec.inference.maxNewTokens)."""
    where = f"{path}:{number}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not JSON ({err.msg} at column {err.colno}); {ROW_FORM}") from None
    if not isinstance(row, dict):
        raise InputError(f"{where}: a JSON {type(row).__name__}, not an object; {ROW_FORM}")
    if "id" not in row:
        raise InputError(f'{where}: missing "id"; {ROW_FORM}')
    rid = row["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise InputError(f'{where}: "id" is {json.dumps(rid)}; use a string or an integer')
    if isinstance(rid, str):
        _check_unicode(where, "id", rid)
    new = row.get("max_new_tokens")
    if new is not None and (isinstance(new, bool) or not isinstance(new, int) or new < 1):
        raise InputError(
            f'{where}: "max_new_tokens" is {json.dumps(new)}; give a positive integer, or leave it out for '
            "spec.inference.maxNewTokens"
        )
    if new is not None and max_new_tokens is not None and new > max_new_tokens:
        raise InputError(
            f'{where}: "max_new_tokens" is {new}, more than spec.inference.maxNewTokens ({max_new_tokens}), '
            "the most any prompt may ask (the KV cache is sized for it): lower it, or raise maxNewTokens"
        )
    has_prompt, has_ids = "prompt" in row, "input_ids" in row
    if has_prompt == has_ids:
        raise InputError(f'{where}: give exactly one of "prompt" (text) or "input_ids" (token ids)')
    if has_prompt:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise InputError(f'{where}: "prompt" is a JSON {type(prompt).__name__}; give text in a string')
        if not prompt:
            raise InputError(f'{where}: "prompt" is empty; give text or remove the line')
        _check_unicode(where, "prompt", prompt)
        return Row(rid, json.dumps(rid), prompt, None, new)
    ids = row["input_ids"]
    if not isinstance(ids, list) or not ids:
        raise InputError(f'{where}: "input_ids" must be a non-empty list of token ids')
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise InputError(
                f'{where}: "input_ids"[{i}] is {json.dumps(t)}; token ids are integers (no floats, no strings)'
            )
        if not 0 <= t < vocab_size:
            raise InputError(
                f'{where}: "input_ids"[{i}] is {t}, outside the model\'s vocabulary [0, {vocab_size})'
            )
    return Row(rid, json.dumps(rid), None, ids, new)


def read_rows(path: str | Path, arch: Arch, max_new_tokens: int | None = None) -> Iterator[tuple[int, Row]]:
    """Every row of the input in order, checked (ids unique, a row's own max_new_tokens at most
    ``max_new_tokens``); refuses an input with no prompt."""
    seen: set[str] = set()
    for number, text in input_lines(path, line_limit(arch.max_positions)):
        row = parse_row(path, number, text, arch.vocab_size, max_new_tokens)
        if row.key in seen:
            raise InputError(f"{path}:{number}: duplicate id {row.key}; ids must be unique")
        seen.add(row.key)
        yield number, row
    if not seen:
        raise InputError(f"{path}: no prompts; {ROW_FORM}")


# Text prompts a tokenizer call takes at once: a fast tokenizer encodes a batch on every core (100k
# prompts of 425 tokens read and tokenized: 115 s one call a prompt, 43 s in batches, on 2 cores), the
# same ids as one by one.
TOKENIZE_BATCH = 256


def _no_tokenizer(path: str | Path, number: int) -> InputError:
    return InputError(
        f'{path}:{number}: a text "prompt" needs a tokenizer in the model directory; add '
        'tokenizer.json or give "input_ids"'
    )


def _nonempty(path: str | Path, number: int, ids: list[int]) -> list[int]:
    if not ids:
        raise InputError(f"{path}:{number}: the prompt tokenizes to nothing; give text or remove the line")
    return ids


def tokenized(
    path: str | Path, rows: Iterable[tuple[int, Row]], tokenizer: Any
) -> Iterator[tuple[int, Row, list[int]]]:
    """(line number, row, token ids) of ``rows``, in order: text prompts a batch at a time."""
    rows = iter(rows)
    while batch := list(islice(rows, TOKENIZE_BATCH)):
        texts = [(number, row.prompt) for number, row in batch if row.input_ids is None]
        if texts and tokenizer is None:
            raise _no_tokenizer(path, texts[0][0])
        encoded = iter(tokenizer([text for _, text in texts])["input_ids"] if texts else ())
        for number, row in batch:
            ids = row.input_ids if row.input_ids is not None else list(next(encoded))
            yield number, row, _nonempty(path, number, ids)


def check_fits(path: str | Path, number: int, row: Row, length: int, max_positions: int) -> None:
    if length >= max_positions:
        raise InputError(
            f"{path}:{number}: prompt {row.key} has {length} tokens; the model has {max_positions} positions "
            "and at least one new token must fit: shorten it"
        )


def _normalizer(tokenizer: Any) -> Callable[[str], str] | None:
    """The text a fast tokenizer's model sees (its normalizer's), or None for a tokenizer whose
    normalization is unknown here (a slow one): its prompts are tokenized to know they fit."""
    # transformers' fast tokenizer: backend_tokenizer (its `backend` is a name); CachedTokenizer: backend
    candidates = (getattr(tokenizer, "backend_tokenizer", None), getattr(tokenizer, "backend", None))
    backend: Any = next((b for b in candidates if hasattr(b, "normalizer")), None)
    if backend is None:
        return None
    normalizer = backend.normalizer
    return (lambda text: text) if normalizer is None else normalizer.normalize_str


def check_input(path: str | Path, arch: Arch, tokenizer: Any, max_new_tokens: int | None = None) -> int:
    """Every line of the input, as the ranks will read it; returns the number of prompts."""
    count, normalized = 0, _normalizer(tokenizer)

    def unsure() -> Iterator[tuple[int, Row]]:
        """The rows that must be tokenized to know they fit."""
        nonlocal count
        for number, row in read_rows(path, arch, max_new_tokens):
            count += 1
            if (
                row.prompt is not None
                and tokenizer is not None
                and normalized is not None
                and len(normalized(row.prompt).encode()) + SPECIAL_TOKENS_MARGIN < arch.max_positions
            ):
                continue  # fits whatever it tokenizes to (see SPECIAL_TOKENS_MARGIN)
            yield number, row

    for number, row, ids in tokenized(path, unsure(), tokenizer):
        check_fits(path, number, row, len(ids), arch.max_positions)
    return count


@dataclass(frozen=True)
class ModelFields:
    """How a refusal names the model directory and the layout: the spec's fields, or a command's flags."""

    path: str = "spec.model.path"
    stages: str = "spec.parallelism.stages"
    tensor_parallel: str = "spec.parallelism.tensorParallel"


def check_model(
    model_dir: str | Path,
    stages: int,
    tensor_parallel: int,
    cache_dir: Path | None = None,
    fields: ModelFields = ModelFields(),
) -> Arch:
    """config.json, the weight files' names, shapes and sizes, and the layout against the model
    (``cache_dir``: the compile cache, which keeps the resolved config)."""
    # torch-free (checkpoint_layout.py): the launcher checks before anything imports torch
    from conveyor.inference.model.checkpoint_layout import (
        HeaderIndex,
        check_divisible,
        read_header,
        stage_layers,
        verify_checkpoint,
        weight_files,
    )
    from conveyor.inference.model.families import load_arch, name_map

    root = Path(model_dir)
    config = root / "config.json"
    if not root.is_dir():
        raise InputError(f"{fields.path}: {root} is not a directory; point it at a HF checkpoint")
    if not config.is_file():
        raise InputError(
            f"{fields.path}: {config} not found; point {fields.path} at a HF checkpoint directory"
        )
    try:
        json.loads(config.read_bytes().decode("utf-8"))
        arch = load_arch(root, cache_dir)
    except (ValueError, OSError, KeyError, AttributeError) as err:  # JSON, unsupported family, HF's own
        raise InputError(
            f"{config}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    if not arch.causal:  # an encoder has no LM head: every rank would load, then fail at its first token
        from conveyor.inference.model.families import CAUSAL_FAMILIES

        raise InputError(
            f"{fields.path}: {root} is a {arch.family} model, an encoder, which does not generate text; "
            f"use a causal family ({', '.join(CAUSAL_FAMILIES)})"
        )
    try:
        headers = {weights: read_header(weights) for weights in sorted(root.glob("*.safetensors"))}
        files = weight_files(root)
        index = HeaderIndex(root, {f: headers[f] if f in headers else read_header(f) for f in files})
    except ValueError as err:  # a damaged or truncated file, or none
        raise InputError(str(err)) from None
    except OSError as err:  # a file the index names is missing or unreadable
        raise InputError(f"{root}: {err}") from None
    try:
        verify_checkpoint(index, arch, name_map(arch))
    except ValueError as err:
        raise InputError(str(err)) from None
    try:
        stage_layers(arch.layers, stages, 0)
    except ValueError as err:
        raise InputError(f"{fields.stages}: {err}") from None
    try:
        check_divisible(arch, tensor_parallel)
    except ValueError as err:
        raise InputError(f"{fields.tensor_parallel}: {' '.join(str(err).split())}") from None
    return arch


def check_output_path(output: Path) -> None:
    """The output (and its progress record and lock beside it) can be created where it is asked for."""
    if output.is_dir():
        raise InputError(f"spec.inference.output: {output} is a directory; name a file")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(
                    f"spec.inference.output: {parent} is a file, so {output} cannot be created: "
                    "choose another path"
                )
            break


def load_tokenizer_checked(model_dir: str, cache_dir: Path | None = None) -> Any:
    from conveyor.inference.model.tokenizer_cache import load_tokenizer

    try:
        return load_tokenizer(model_dir, cache_dir)
    except Exception as err:  # tokenizers raise many kinds; the file is what matters
        raise InputError(f"{model_dir}: the tokenizer does not load ({err})") from None


def check_seq_length(seq_length: int, max_positions: int) -> None:
    """A fine-tuning sequence must fit the model's positions: a learned position table (GPT-2, OPT)
    has no row past them (an IndexError in the first step, restarted as a crash) and rotary positions
    past them were never trained."""
    if seq_length > max_positions:
        raise InputError(
            f"spec.train.seqLength {seq_length} is longer than the model's {max_positions} positions "
            f"(max_position_embeddings in config.json): use seqLength <= {max_positions}"
        )


def needs_preflight(spec: PipelineJobSpec) -> bool:
    """A batch inference job, a serve job or a fine-tuning one (its model and layout, and a serve job's
    tokenizer) is checked before ranks start."""
    return spec.mode in ("inference", "serve") or (spec.train is not None and spec.train.fine_tunes)


def preflight(
    spec: PipelineJobSpec,
    *,
    input_and_output: bool = True,
    cache_dir: Path | None = None,
    replica: int | None = None,
) -> None:
    """Everything a batch inference job can check before a rank starts. ``input_and_output``: also the
    input and the output (the stage-0 pods, which read and write them); ``cache_dir``: the compile cache;
    ``replica``: the pod's (``conveyor worker``), whose part alone is probed for a writer, since the
    other replicas' ranks hold their parts' locks while they run (None, ``conveyor run``: every part).
    A fine-tuning job: its model and layout (stages within the layers, tensorParallel dividing heads, KV
    heads and MLP width)."""
    from conveyor.inference.progress import ResultLog, job_identity

    inf, model = spec.inference, spec.model
    assert model is not None
    p = spec.parallelism
    arch = check_model(model.path, p.stages, p.tensor_parallel, cache_dir)
    if spec.train is not None:
        check_seq_length(spec.train.seq_length, arch.max_positions)
    # serve mode tokenizes every request's text
    if spec.serve is not None and load_tokenizer_checked(model.path, cache_dir) is None:
        raise InputError(
            f"spec.model.path: {model.path} has no tokenizer, which serve mode needs for the requests' "
            "text: add tokenizer.json (or tokenizer_config.json and its files)"
        )
    if inf is None or not input_and_output:
        return
    if not Path(inf.input).is_file():
        raise InputError(f"spec.inference.input: {inf.input} does not exist; give a JSONL file of prompts")
    check_input(inf.input, arch, load_tokenizer_checked(model.path, cache_dir), inf.max_new_tokens)
    output = Path(inf.output)
    check_output_path(output)
    identity = job_identity(spec)
    for part_replica in range(max(p.replicas, 1)):
        part = output if p.replicas <= 1 else output.with_name(f"{output.name}.r{part_replica}")
        results = ResultLog(part, identity)
        merged = output if p.replicas > 1 else None
        results.check(merged, inf.input)
        if merged is None or not results.done:  # (a finished replica's part may be gone once merged)
            results.check_committed()
        if replica is None or replica == part_replica:
            results.lock(merged)  # a probe: another run writing it now is refused before we start
            results.unlock()
