"""Committed progress of a batch inference job: results appended to a JSONL file, committed atomically.

Commit protocol (docs/inference.md): append result lines, flush and fsync the file, then atomically
replace a small progress record (write a temporary file, fsync, ``os.replace``, fsync the directory)
holding the committed byte length of the output. A line past that length was never committed: a
restarted job truncates it and computes that prompt again, so the output holds every prompt exactly
once whatever moment a rank died.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from conveyor.checkpoint import fsync_dir, rfc3339


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

    def __init__(self, output: str | Path):
        self.path = Path(output)
        self.record_path = self.path.with_name(self.path.name + ".progress.json")
        self.record = self._read_record()
        self._file: Any = None
        self._uncommitted = 0

    def _read_record(self) -> dict[str, Any]:
        if self.record_path.is_file():
            return dict(json.loads(self.record_path.read_text()))
        return {"committedBytes": 0, "completed": 0, "done": False}

    @property
    def done(self) -> bool:
        return bool(self.record.get("done"))

    @property
    def completed(self) -> int:
        return int(self.record.get("completed", 0))

    def committed_ids(self) -> set[str]:
        """Ids of the committed results; drops (truncates) any uncommitted tail first."""
        size = int(self.record["committedBytes"])
        if not self.path.exists():
            if size:
                raise RuntimeError(
                    f"{self.path} is gone but {self.record_path} records {size} committed bytes"
                )
            return set()
        with open(self.path, "r+b") as f:
            f.truncate(size)
            f.seek(0)
            data = f.read()
        return {json.dumps(json.loads(line)["id"]) for line in data.splitlines() if line.strip()}

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 (held open across appends; close())

    def append(self, result: dict[str, Any]) -> None:
        self._file.write((json.dumps(result) + "\n").encode())
        self._file.flush()  # visible as results complete; committed only by commit()
        self._uncommitted += 1

    @property
    def uncommitted(self) -> int:
        return self._uncommitted

    def commit(self, done: bool = False) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            size = self._file.tell()
        else:
            size = int(self.record["committedBytes"])
        self.record = {
            "committedBytes": size,
            "completed": self.completed + self._uncommitted,
            "done": done,
            "time": rfc3339(),
        }
        write_json_atomic(self.record_path, self.record)
        self._uncommitted = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def merge_parts(parts: list[ResultLog], output: Path) -> bool:
    """When every replica's part is done, write their committed lines to ``output`` atomically.
    Called by each replica as it finishes; whoever finishes last merges (a tie merges twice, equally)."""
    if not all(p._read_record().get("done") for p in parts):
        return False
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        for part in parts:
            size = int(part._read_record()["committedBytes"])
            with open(part.path, "rb") as f:
                out.write(f.read(size))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, output)
    fsync_dir(output.parent)
    return True
