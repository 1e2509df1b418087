"""Committed progress of a batch inference job: results appended to a JSONL file, committed atomically.

Commit protocol (docs/inference.md): append result lines, flush and fsync the file, then atomically
replace a small progress record (write a temporary file, fsync, ``os.replace``, fsync the directory)
holding the committed byte length of the output. A line past that length was never committed: a
restarted job truncates it and computes that prompt again, so the output holds every prompt exactly
once whatever moment a rank died. ``append`` and ``commit`` may run on two threads (the batch job
commits on a thread of its own): a commit covers the lines appended before it began.

Whose results these are: the record carries the job's identity (``job_identity``: digests of the
input file, the model and its tokenizer, and the settings that decide the tokens), and a run refuses
an output whose record names another job, or an output that holds bytes but has no record at all:
neither is ever appended to, truncated or overwritten. One run at a time writes an output: the writer
holds an exclusive ``flock`` on ``<output>.lock`` (released by the kernel when the process dies, so a
killed run leaves no stale lock); taking it, a writer removes the temporary files a killed writer of
the same output left (a record being replaced, a merge). With R > 1 replicas, each writes its part
``<output>.r<r>`` under that part's lock and holds the merged output's lock shared, since the replicas merge into it together: a
one-replica job on the same output is refused while any of them runs, and the other way round. A
merge writes only where the output is missing or already holds the same bytes.
"""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor import file_lock
from conveyor.commit_protocol import fsync_dir, rfc3339
from conveyor.inference.validate import InputError
from conveyor.log import get_logger
from conveyor.stop_points import MERGE_REPLACED, MERGE_WRITTEN, STOP_POINTS

if TYPE_CHECKING:
    from conveyor.spec import PipelineJobSpec

log = get_logger(__name__)

_EDGE_BYTES = 1 << 20  # of each weight file, hashed at both ends (hashing whole models takes minutes)


class ResultsError(InputError):
    """An output that is not this job's, or that another run is writing: refused, never touched."""


def file_digest(path: Path, whole: bool = True) -> str:
    """sha256 of a file, streamed; ``whole=False``: of its size and first and last MiB only."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if whole or size <= 2 * _EDGE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode() + f.read(_EDGE_BYTES))
            f.seek(size - _EDGE_BYTES)
            h.update(f.read())
    return h.hexdigest()


def model_digest(model_dir: str | Path) -> str:
    """The model's config and weights, cheaply: config.json whole, each weight file by size and ends
    (a fine-tune of the same shape differs in its first MiB of tensor data)."""
    root, h = Path(model_dir), hashlib.sha256()
    for path in sorted(root.iterdir()):
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin"):
            whole = path.suffix == ".json"
            h.update(f"{path.name}:{file_digest(path, whole)}\n".encode())
    return h.hexdigest()


def tokenizer_digest(model_dir: str | Path) -> str | None:
    """The tokenizer's files, whole (they decide a text prompt's tokens and every result's text); None
    for a model directory without any."""
    from conveyor.inference.model.tokenizer_cache import TOKENIZER_FILES  # (which imports this module)

    root, h, found = Path(model_dir), hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        if (root / name).is_file():
            found = True
            h.update(f"{name}:{file_digest(root / name)}\n".encode())
    return h.hexdigest() if found else None


def _digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps({k: v for k, v in identity.items() if k != "digest"}, sort_keys=True).encode()
    ).hexdigest()


def same_job(theirs: dict[str, Any], ours: dict[str, Any]) -> bool:
    """Whether two job identities are one job's. One written before the tokenizer was part of the
    identity has no such key: it is compared with the other's identity less its tokenizer."""
    if theirs.get("digest") == ours.get("digest"):
        return True
    for old, new in ((theirs, ours), (ours, theirs)):
        if "tokenizer" not in old and "tokenizer" in new:
            return old.get("digest") == _digest({k: v for k, v in new.items() if k != "tokenizer"})
    return False


def job_identity(spec: PipelineJobSpec) -> dict[str, Any]:
    """What makes results this job's: the input's bytes, the model, and every setting that decides the
    tokens or which prompts a replica's part holds. ``digest`` sums them up."""
    inf, model = spec.inference, spec.model
    assert inf is not None and model is not None
    identity: dict[str, Any] = {
        "input": file_digest(Path(inf.input)),
        "model": model_digest(model.path),
        "settings": {
            "dtype": model.dtype,
            "quantization": inf.quantization,
            "maxNewTokens": inf.max_new_tokens,
            "sampling": inf.sampling.model_dump(mode="json", by_alias=True),
            "replicas": spec.parallelism.replicas,
        },
    }
    if model.kv_cache_dtype != "auto":  # (only where set: results written before the field stay this job's)
        identity["settings"]["kvCacheDtype"] = model.kv_cache_dtype
    identity["tokenizer"] = tokenizer_digest(model.path)  # (None, not absent, where there is none)
    identity["digest"] = _digest(identity)
    return identity


def identity_difference(
    theirs: dict[str, Any], ours: dict[str, Any], named: dict[str, str], fallback: str
) -> str:
    """Which part of two run identities differs, in words: ``named`` keys by what a change means ("another
    model"), then each setting that differs, by its value in ``theirs``; ``fallback`` where none does. A key
    absent from ``theirs`` was recorded before it was (the batch job's tokenizer), so it is not a change."""
    parts = [words for key, words in named.items() if key in theirs and theirs.get(key) != ours.get(key)]
    mine, other = ours.get("settings", {}), theirs.get("settings") or {}
    parts += [f"{key} {other.get(key)!r}" for key in mine if other.get(key) != mine[key]]
    return ", ".join(parts) or fallback


def _difference(theirs: dict[str, Any], ours: dict[str, Any], input_file: str | None = None) -> str:
    """``input_file``: the job's input, named where it changed (a line appended or edited since)."""
    changed = f" ({input_file} changed since they were committed)" if input_file else ""
    what = {
        "input": f"another input file{changed}",
        "model": "another model",
        "tokenizer": "another tokenizer",
    }
    return identity_difference(theirs, ours, what, "another job")


def keep_json(path: Path, record: dict[str, Any], what: str) -> None:
    """Write a cache's ``record`` (``what`` it is, for the log) atomically, if the directory can be
    written: a cache saves time, so a read-only home or volume costs that time, not the run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
    except OSError as err:
        log.warning(f"{what} not kept in {path.parent}: {err}")


def write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ResultLog:
    """One writer's output file and its progress record (``<output>.progress.json``)."""

    def __init__(self, output: str | Path, identity: dict[str, Any] | None = None):
        self.path = Path(output)
        self.record_path = self.path.with_name(self.path.name + ".progress.json")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.identity = identity  # None: read only (status, merging), no identity check
        self.record = self._read_record()
        self._file: Any = None
        self._locks: list[tuple[Any, bool]] = []  # (open lock file, exclusive), held until unlock()
        self._uncommitted = 0
        self._appending = threading.Lock()  # the file's end and the count of lines not committed agree
        self._committing = threading.Lock()  # one commit at a time

    def _read_record(self) -> dict[str, Any]:
        if self.record_path.is_file():
            try:
                return dict(json.loads(self.record_path.read_text()))
            except (ValueError, UnicodeDecodeError) as err:  # never written so (atomic replace)
                raise ResultsError(
                    f"{self.record_path}: unreadable progress record ({err}); {self.path} cannot be trusted: "
                    "move both away to start again"
                ) from None
        return {"committedBytes": 0, "completed": 0, "done": False}

    def check(self, merged: Path | None = None, input_file: str | None = None) -> None:
        """Refuse results that are not this job's (see the module's docstring). ``merged``: the merged
        output of R > 1 replicas, which must not predate this job's parts either; ``input_file``: the
        job's input, named where it is what changed."""
        assert self.identity is not None, "check() needs the job's identity"
        fix = "move it away or set spec.inference.output to a new file"
        if merged is not None:
            single = merged.with_name(merged.name + ".progress.json")
            if single.is_file():  # the replicas' merged output keeps no record: a one-replica job wrote it
                raise ResultsError(
                    f"{merged} holds results of another job (its progress record {single.name} is a "
                    f"one-replica job's, and this job's replicas merge their parts into it): {fix}"
                )
        if not self.record_path.is_file():
            for path in (self.path, merged):
                if path is not None and path.is_file() and path.stat().st_size:
                    raise ResultsError(
                        f"{path} already holds {path.stat().st_size} bytes but has no progress record "
                        f"({self.record_path.name}), so they are not this job's results: {fix}"
                    )
            return
        theirs = self.record.get("job")
        if not isinstance(theirs, dict) or not same_job(theirs, self.identity):
            why = (
                _difference(theirs, self.identity, input_file)
                if isinstance(theirs, dict)
                else "no job identity"
            )
            raise ResultsError(
                f"{self.path} holds results of another job (its progress record {self.record_path.name} "
                f"differs: {why}): {fix}, or restore that job's input, model and settings"
            )

    def lock(self, merged: Path | None = None) -> None:
        """Take the output's exclusive lock for this process's lifetime, or refuse: another run writes it.
        ``merged``: the merged output of R > 1 replicas, whose lock is taken shared (see the module's
        docstring), before this part's."""
        if merged is not None:
            merged_lock = merged.with_name(merged.name + ".lock")
            self._locks.append((_take_lock(merged, merged_lock, exclusive=False), False))
        try:
            self._locks.append((_take_lock(self.path, self.lock_path, exclusive=True), True))
        except ResultsError:
            self.unlock()
            raise
        self._remove_leftovers()

    @property
    def merge_temporary(self) -> Path:
        """Where this part's writer merges the replicas' parts before it replaces the output: a name of
        its own (the replicas are pods, two may merge at once with the same pid), which only the holder
        of this part's lock writes, so that its next holder knows what a kill left."""
        return self.path.with_name(f".{self.path.name}.merge.tmp")

    def _remove_leftovers(self) -> None:
        """The temporary files of a writer killed before it renamed or removed them (a progress record
        being written, a merge: a copy of every result). Only the holder of this lock writes them."""
        record_tmp = f".{self.record_path.name}."  # (write_json_atomic's: the pid, then .tmp)
        for path in self.path.parent.iterdir():
            if path.name.startswith(record_tmp) and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
        self.merge_temporary.unlink(missing_ok=True)

    def unlock(self) -> None:
        for f, exclusive in reversed(self._locks):
            if exclusive:  # (its holder's name)
                with contextlib.suppress(OSError):
                    f.truncate(0)
            f.close()  # closing releases the flock
        self._locks = []

    @property
    def done(self) -> bool:
        return bool(self.record.get("done"))

    @property
    def completed(self) -> int:
        return int(self.record.get("completed", 0))

    def check_committed(self) -> None:
        """Refuse an output that lost committed results (gone, or shorter than its record says), done
        or not: a finished job must not report them complete, nor a merge copy less than they were."""
        size = int(self.record["committedBytes"])
        if not self.path.exists():
            if size:
                raise ResultsError(
                    f"{self.path} is gone but {self.record_path} records {size} committed bytes: restore "
                    f"it, or remove {self.record_path.name} to compute every prompt again"
                )
            return
        if self.path.stat().st_size < size:
            raise ResultsError(
                f"{self.path} has {self.path.stat().st_size} bytes but {self.record_path.name} records {size} "
                f"committed: it was cut or replaced; restore it, or move both away to start again"
            )

    def committed_ids(self) -> set[str]:
        """Ids of the committed results; drops (truncates) any uncommitted tail first."""
        self.check_committed()
        if not self.path.exists():
            return set()
        size = int(self.record["committedBytes"])
        with open(self.path, "r+b") as f:
            f.truncate(size)
            f.seek(0)
            data = f.read()
        ids = set()
        for number, line in enumerate(data.splitlines(), start=1):
            if line.strip():
                ids.add(self._committed_id(number, line))
        return ids

    def _committed_id(self, number: int, line: bytes) -> str:
        """A committed line's id as compared (json.dumps), or a refusal: the output was edited."""
        try:
            row = json.loads(line)
            why = 'no "id"' if not isinstance(row, dict) or "id" not in row else None
        except ValueError as err:
            why = f"not JSON: {err}"
        if why is not None:
            raise ResultsError(
                f"{self.path}:{number}: committed line is not a result ({why}): the output was edited; "
                "restore it, or move it and its progress record away to start again"
            )
        return json.dumps(row["id"])

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.record_path.is_file():
            # A record of nothing committed before the first line: an append is visible at once and
            # committed a moment later, and a writer killed in between left bytes with no record, which
            # every restart refused as another job's.
            self.commit()
        self._file = open(self.path, "ab")  # noqa: SIM115 (held open across appends; close())

    def append(self, result: dict[str, Any]) -> None:
        line = (json.dumps(result) + "\n").encode()
        with self._appending:
            self._file.write(line)
            self._file.flush()  # visible as results complete; committed only by commit()
            self._uncommitted += 1

    @property
    def uncommitted(self) -> int:
        return self._uncommitted

    def commit(self, done: bool = False) -> int:
        """Make the lines appended so far durable and record them; returns how many it committed."""
        with self._committing:
            with self._appending:
                if self._file is not None:
                    self._file.flush()
                    size = self._file.tell()
                else:
                    size = int(self.record["committedBytes"])
                count = self._uncommitted
            if self._file is not None:
                os.fsync(self._file.fileno())  # (lines appended since are synced too; recorded later)
            record = {
                "committedBytes": size,
                "completed": self.completed + count,
                "done": done,
                "time": rfc3339(),
                "job": self.identity if self.identity is not None else self.record.get("job"),
            }
            write_json_atomic(self.record_path, record)
            with self._appending:
                self.record = record
                self._uncommitted -= count
            return count

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _take_lock(path: Path, lock_path: Path, exclusive: bool) -> Any:
    """``lock_path`` open and ``flock``ed (held until closed), or a refusal naming who holds it."""
    try:
        return file_lock.take(lock_path, exclusive)
    except file_lock.Busy as busy:  # (the replicas of a job hold it shared: "another process")
        raise ResultsError(
            f"{path} is being written by another run ({busy.holder} holds {lock_path.name}): "
            "wait for it to finish or set spec.inference.output to another file"
        ) from None
    except OSError as err:
        raise ResultsError(
            f"spec.inference.output: cannot create {lock_path} ({err.strerror}): choose a writable path"
        ) from None


def merge_parts(parts: list[ResultLog], output: Path, by: ResultLog) -> bool:
    """When every replica's part is done, write their committed lines to ``output`` atomically, through
    ``by``'s (the merging replica's part's) temporary file. Called by each replica as it finishes, and by a finished replica's restart while ``output`` is
    missing (its writer died between its last commit and the merge); a tie merges twice, equally, and
    finds the same bytes there. An ``output`` holding other bytes is refused, never replaced."""
    records = [p._read_record() for p in parts]
    if not all(r.get("done") for r in records):
        return False
    for part, record in zip(parts, records, strict=True):
        part.record = record
        part.check_committed()
    # Each replica checks its own part against the job: one that first started after the input was
    # edited wrote its share of another input (shares are every R-th line: prompts lost or repeated).
    jobs = [r.get("job") or {} for r in records]
    if any(not same_job(jobs[0], job) for job in jobs):
        other = next(job for job in jobs if not same_job(jobs[0], job))
        raise ResultsError(
            f"{output}: the parts {', '.join(p.path.name for p in parts)} hold results of different jobs "
            f"({_difference(jobs[0], other)}: changed while the replicas ran), never merged: move the parts "
            "and their progress records away to compute them again"
        )
    # (not mkstemp's: its file is the owner's alone, and the output is read by others on the volume)
    tmp = by.merge_temporary
    try:
        with open(tmp, "wb") as out:  # (one a kill left, where the lock's holder has not removed it yet)
            for part, record in zip(parts, records, strict=True):
                with open(part.path, "rb") as f:
                    left = int(record["committedBytes"])
                    while left > 0 and (block := f.read(min(left, 1 << 20))):
                        out.write(block)
                        left -= len(block)
            out.flush()
            os.fsync(out.fileno())
        STOP_POINTS.reach(MERGE_WRITTEN)  # (tests only: a kill here)
        if output.exists():
            if not filecmp.cmp(tmp, output, shallow=False):
                raise ResultsError(
                    f"{output} holds bytes that are not this job's merged results (the committed lines of "
                    f"{', '.join(p.path.name for p in parts)}): move it away and run the job again; its "
                    "finished replicas merge them at their next start"
                )
            return True
        os.replace(tmp, output)
        fsync_dir(output.parent)
        STOP_POINTS.reach(MERGE_REPLACED)
    finally:
        tmp.unlink(missing_ok=True)
    return True
