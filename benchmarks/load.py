"""How fast a rank's weights reach the GPU, against what the machine can do: the loader (``load_stage``)
beside the raw paths it is built from, on the same checkpoint in the same run (the files in the page
cache, as a warm start finds them).

- ``load_stage``: the rank's "load" lap (checks, reads, fused copies, transfers): the files read by
  threads straight into GPU memory (``Checkpoint(device=...)``).
- ``load_stage_mapped``: the same through the memory map and pinned staging (the loader before that).
- ``pread_pinned[_N]``: every file read with ``os.preadv`` into reused pinned buffers by N threads, each
  chunk copied to the GPU asynchronously: the bandwidth a loader that skips the mapping could reach.

    python3 benchmarks/load.py --model-shape llama2-7b --out benchmarks/results/load.json
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "worker"), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402

from benchmarks.common import SHAPES, save_report  # noqa: E402
from benchmarks.generate import DTYPES, build_checkpoint  # noqa: E402


def files_of(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def total_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def time_load_stage(model_dir: Path, dtype: torch.dtype, device: torch.device, mapped: bool = False) -> float:
    from conveyor.inference.model.families import load_arch
    from conveyor.inference.model.loader import Checkpoint, load_stage

    arch = load_arch(model_dir)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    source = Checkpoint(model_dir) if mapped else model_dir
    model = load_stage(source, arch, dtype=dtype, device=device)
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return dt


def read_through(files: list[Path], chunk: int = 64 << 20) -> None:
    """Every byte of ``files`` read once, so each timed path finds them in the page cache."""
    buf = bytearray(chunk)
    for f in files:
        with open(f, "rb", buffering=0) as handle:
            while handle.readinto(buf):
                pass


def time_pread_pinned(files: list[Path], device: torch.device, threads: int, chunk: int = 64 << 20) -> float:
    """Each thread reads its share of the chunks into its own two pinned buffers and sends them on. Kept
    apart from staging.FileToDevice on purpose: the ceiling is measured without the code it judges."""
    size = total_bytes(files)
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    jobs: list[tuple[Path, int, int, int]] = []  # file, offset in file, bytes, offset in dst
    at = 0
    for f in files:
        n = f.stat().st_size
        for off in range(0, n, chunk):
            jobs.append((f, off, min(chunk, n - off), at + off))
        at += n

    def work(mine: list[tuple[Path, int, int, int]]) -> None:
        stream = torch.cuda.Stream(device)
        bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        events: list[torch.cuda.Event | None] = [None, None]
        fds: dict[Path, int] = {}
        for i, (f, off, n, to) in enumerate(mine):
            b = i % 2
            if events[b] is not None:
                events[b].synchronize()  # type: ignore[union-attr]
            fd = fds.setdefault(f, os.open(f, os.O_RDONLY))
            view = memoryview(bufs[b].numpy())[:n]
            got = os.preadv(fd, [view], off)
            assert got == n
            with torch.cuda.stream(stream):
                dst[to : to + n].copy_(bufs[b][:n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            events[b] = ev
        for ev in events:
            if ev is not None:
                ev.synchronize()
        for fd in fds.values():
            os.close(fd)

    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    pool = [threading.Thread(target=work, args=(jobs[i::threads],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    dst.untyped_storage().resize_(0)
    torch.cuda.empty_cache()
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", default="llama2-7b", choices=list(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="1,2,4,8")
    p.add_argument("--workdir", default="/tmp/conveyor-bench")
    p.add_argument("--out", default="benchmarks/results/load.json")
    args = p.parse_args()
    dtype, device = DTYPES[args.dtype], torch.device("cuda")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_checkpoint(args.model_shape, dtype, "cuda", workdir)
    files = files_of(model_dir)
    size = total_bytes(files)
    read_through(files)  # the files in the page cache, as a warm start finds them
    report: dict[str, Any] = {
        "shape": args.model_shape,
        "bytes": size,
        "device": torch.cuda.get_device_name(),
    }
    rows: dict[str, list[float]] = {"load_stage": [], "load_stage_mapped": []}
    for n in (int(v) for v in args.threads.split(",")):
        rows[f"pread_pinned_{n}"] = []
    for _ in range(args.repeats):
        rows["load_stage"].append(time_load_stage(model_dir, dtype, device))
        rows["load_stage_mapped"].append(time_load_stage(model_dir, dtype, device, mapped=True))
        for n in (int(v) for v in args.threads.split(",")):
            rows[f"pread_pinned_{n}"].append(time_pread_pinned(files, device, n))
    report["seconds"] = rows
    report["gb_per_s"] = {k: round(size / min(v) / 1e9, 2) for k, v in rows.items()}
    for k, v in rows.items():
        print(
            f"{k:>18}: best {min(v):.2f} s ({size / min(v) / 1e9:.1f} GB/s), all {[round(x, 2) for x in v]}"
        )
    save_report(report, args.out)


if __name__ == "__main__":
    main()
