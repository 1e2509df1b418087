"""Results are never destroyed, mixed or duplicated (inference/progress.py): an output without a progress
record, or whose record is another job's, is refused and left as it was; one run at a time writes an
output (its lock); the record carries the job's identity."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conveyor.inference.progress import ResultLog, ResultsError, job_identity, merge_parts
from conveyor.inference.validate import preflight
from conveyor.spec import parse_spec
from conveyor.testing.tiny import save_tiny

from tests.conftest import conveyor_cmd, subprocess_env


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama")


def spec_dict(tmp: Path, model: Path, prompts: int = 4) -> dict:
    (tmp / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "input_ids": [5 + i, 9, 11]}) + "\n" for i in range(prompts))
    )
    return {
        "mode": "inference",
        "device": "cpu",
        "model": {"path": str(model), "dtype": "float32"},
        "parallelism": {"stages": 2},
        "checkpoint": {"path": str(tmp / "ckpt"), "every": 1},
        "inference": {"input": str(tmp / "in.jsonl"), "output": str(tmp / "out.jsonl"), "maxNewTokens": 4},
    }


def committed_log(tmp: Path, identity: dict, rows: int = 3) -> ResultLog:
    results = ResultLog(tmp / "out.jsonl", identity)
    results.open()
    for i in range(rows):
        results.append({"id": i, "output_ids": [1], "text": "", "finish_reason": "length"})
    results.commit()
    results.close()
    return results


def test_output_without_a_record_is_refused_and_kept(model: Path, tmp_path: Path) -> None:
    spec = parse_spec(spec_dict(tmp_path, model))
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(30)))
    before = out.read_bytes()
    with pytest.raises(ResultsError, match=r"out.jsonl already holds \d+ bytes but has no progress record"):
        ResultLog(out, job_identity(spec)).check()
    assert out.read_bytes() == before
    out.write_text("")  # an empty file holds no results: nothing to protect
    ResultLog(out, job_identity(spec)).check()


@pytest.mark.parametrize(
    "change, why",
    [
        (
            lambda s, tmp: (tmp / "in.jsonl").write_text('{"id": "other", "input_ids": [3]}\n'),
            "another input file",
        ),
        (lambda s, tmp: s["inference"].update(maxNewTokens=9), "maxNewTokens 4"),
        (lambda s, tmp: s["inference"].update(sampling={"temperature": 0.5, "seed": 1}), "sampling"),
        (lambda s, tmp: s["model"].update(dtype="bfloat16"), "dtype 'float32'"),
        (lambda s, tmp: s["model"].update(kvCacheDtype="fp8"), "kvCacheDtype None"),
    ],
    ids=["input", "max-new-tokens", "sampling", "dtype", "kv-cache-dtype"],
)
def test_a_record_of_another_job_is_refused(model: Path, tmp_path: Path, change, why: str) -> None:
    first = spec_dict(tmp_path, model)
    identity = job_identity(parse_spec(first))
    committed_log(tmp_path, identity)
    before = (tmp_path / "out.jsonl").read_bytes()
    second = json.loads(json.dumps(first))
    change(second, tmp_path)
    with pytest.raises(ResultsError, match="holds results of another job") as err:
        ResultLog(tmp_path / "out.jsonl", job_identity(parse_spec(second))).check()
    assert why in str(err.value)
    assert (tmp_path / "out.jsonl").read_bytes() == before
    ResultLog(tmp_path / "out.jsonl", identity).check()  # its own job resumes


def test_the_default_kv_cache_dtype_keeps_the_identity_outputs_were_written_with(
    model: Path, tmp_path: Path
) -> None:
    """kvCacheDtype came later: ``auto`` (the default, written in by the API server) must not make an
    output committed before it another job's."""
    spec = spec_dict(tmp_path, model)
    before = job_identity(parse_spec(spec))
    spec["model"]["kvCacheDtype"] = "auto"
    assert job_identity(parse_spec(spec)) == before


def test_another_model_is_another_job(model: Path, tmp_path: Path) -> None:
    other = save_tiny("llama", tmp_path / "other", seed=1)  # same shape, other weights
    spec = spec_dict(tmp_path, model)
    committed_log(tmp_path, job_identity(parse_spec(spec)))
    spec["model"]["path"] = str(other)
    with pytest.raises(ResultsError, match="another model"):
        ResultLog(tmp_path / "out.jsonl", job_identity(parse_spec(spec))).check()


def test_a_cut_output_is_refused_not_truncated_further(model: Path, tmp_path: Path) -> None:
    identity = job_identity(parse_spec(spec_dict(tmp_path, model)))
    committed_log(tmp_path, identity)
    out = tmp_path / "out.jsonl"
    out.write_bytes(out.read_bytes()[:10])
    with pytest.raises(ResultsError, match="was cut or replaced"):
        ResultLog(out, identity).committed_ids()
    assert len(out.read_bytes()) == 10


def test_one_writer_at_a_time_and_a_killed_writer_leaves_no_lock(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    first = ResultLog(out)
    first.lock()
    with pytest.raises(ResultsError, match="being written by another run"):
        ResultLog(out).lock()
    first.unlock()
    ResultLog(out).lock()  # free again (released at garbage collection of this one)

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from conveyor.inference.progress import ResultLog as R; r = R({str(out)!r}); "
            "r.lock(); print('locked', flush=True); import time; time.sleep(60)",
        ],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    with pytest.raises(ResultsError, match=f"pid {holder.pid}"):
        ResultLog(out).lock()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    ResultLog(out).lock()  # the kernel released it with the process


def test_an_output_that_cannot_be_created_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")  # the rank's own check, whatever the pre-flight said
    with pytest.raises(ResultsError, match="spec.inference.output: cannot create .* choose a writable path"):
        ResultLog(tmp_path / "afile" / "sub" / "out.jsonl").lock()


def _run(tmp: Path, spec: dict) -> subprocess.CompletedProcess[str]:
    doc = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": "s"},
        "spec": spec,
    }
    (tmp / "job.yaml").write_text(yaml.safe_dump(doc))
    return subprocess.run(
        conveyor_cmd("run", str(tmp / "job.yaml")),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.integration
def test_conveyor_run_keeps_another_jobs_results(model: Path, tmp_path: Path) -> None:
    """A finished job, then a job with other prompts on the same output: refused, nothing run or
    written (before: "already complete" with none of the new prompts run); the first job still
    resumes as complete; a job on an unrecorded output is refused too."""
    spec = spec_dict(tmp_path, model)
    done = _run(tmp_path, spec)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out.jsonl"
    before = out.read_bytes()
    assert len(before.splitlines()) == 4
    record = json.loads((tmp_path / "out.jsonl.progress.json").read_text())
    assert record["done"] and record["job"]["digest"] == job_identity(parse_spec(spec))["digest"]

    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "new", "input_ids": [7, 8]}) + "\n")
    other = _run(tmp_path, spec)
    assert other.returncode == 2, other.stdout + other.stderr
    assert "Traceback" not in other.stdout + other.stderr
    assert f"{out} holds results of another job" in other.stderr
    assert f"another input file ({tmp_path / 'in.jsonl'} changed" in other.stderr
    assert out.read_bytes() == before

    (tmp_path / "out.jsonl.progress.json").unlink()
    unrecorded = _run(tmp_path, spec)
    assert unrecorded.returncode == 2 and "has no progress record" in unrecorded.stderr
    assert out.read_bytes() == before


@pytest.mark.integration
def test_conveyor_run_refuses_an_output_another_run_writes(model: Path, tmp_path: Path) -> None:
    spec = spec_dict(tmp_path, model)
    holder = ResultLog(tmp_path / "out.jsonl")
    holder.lock()  # as a running job's rank 0 holds it
    try:
        result = _run(tmp_path, spec)
    finally:
        holder.unlock()
    assert result.returncode == 2, result.stdout + result.stderr
    assert "being written by another run" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


# With R > 1 replicas, replica r writes <output>.r<r> and the last to finish merges the parts into
# <output>: that file is written by the replicas together, and by no one else.


def replica_parts(tmp: Path, model: Path, done: bool = True) -> tuple[dict, list[ResultLog]]:
    """A 2-replica job whose parts hold committed results (``done``: both finished)."""
    spec = spec_dict(tmp, model)
    spec["parallelism"]["replicas"] = 2
    identity = job_identity(parse_spec(spec))
    parts = []
    for r in range(2):
        part = ResultLog(tmp / f"out.jsonl.r{r}", identity)
        part.open()
        part.append({"id": r, "output_ids": [1], "text": "", "finish_reason": "length"})
        part.commit(done=done)
        part.close()
        parts.append(part)
    return spec, parts


def test_replicas_share_the_merged_outputs_lock_and_a_single_writer_is_refused(tmp_path: Path) -> None:
    """A one-replica job and a two-replica job on the same output ran at once, each holding only its
    own file's lock: the replicas' merge replaced the other job's results while it wrote them, and
    both jobs succeeded."""
    out = tmp_path / "out.jsonl"
    replicas = [ResultLog(tmp_path / f"out.jsonl.r{r}") for r in range(2)]
    for part in replicas:
        part.lock(merged=out)  # replicas of one job hold the merged output together
    with pytest.raises(ResultsError, match="out.jsonl is being written by another run"):
        ResultLog(out).lock()
    for part in replicas:
        part.unlock()
    single = ResultLog(out)
    single.lock()
    with pytest.raises(ResultsError, match="out.jsonl is being written by another run"):
        ResultLog(tmp_path / "out.jsonl.r0").lock(merged=out)
    assert not (tmp_path / "out.jsonl.r0.lock").read_text()  # refused whole: it holds no part's lock
    single.unlock()
    ResultLog(tmp_path / "out.jsonl.r0").lock(merged=out)


def test_replicas_refuse_a_merged_output_that_a_single_writer_records(model: Path, tmp_path: Path) -> None:
    """Two replicas stopped with their parts half done; a one-replica job then wrote the output. The
    replicas' restart checked only their own parts' records, and their merge replaced its results."""
    spec, parts = replica_parts(tmp_path, model, done=False)
    single = ResultLog(tmp_path / "out.jsonl", {"digest": "another job"})
    single.open()
    single.append({"id": "x", "output_ids": [1], "text": "", "finish_reason": "length"})
    single.commit(done=True)
    single.close()
    with pytest.raises(ResultsError, match="out.jsonl holds results of another job"):
        ResultLog(tmp_path / "out.jsonl.r0", job_identity(parse_spec(spec))).check(
            merged=tmp_path / "out.jsonl"
        )


def test_a_merge_never_replaces_bytes_that_are_not_the_parts(model: Path, tmp_path: Path) -> None:
    _, parts = replica_parts(tmp_path, model)
    out = tmp_path / "out.jsonl"
    merged = b"".join((tmp_path / f"out.jsonl.r{r}").read_bytes() for r in range(2))
    out.write_bytes(b'{"id": "theirs"}\n')
    with pytest.raises(ResultsError, match="out.jsonl holds bytes that are not this job's merged results"):
        merge_parts(parts, out, by=parts[0])
    assert out.read_bytes() == b'{"id": "theirs"}\n'
    out.unlink()
    # another replica's merge under way (its pod may have this one's pid) is never written or moved
    theirs = parts[1].merge_temporary
    theirs.write_bytes(b"another replica's merge under way\n")
    assert merge_parts(parts, out, by=parts[0]) and out.read_bytes() == merged
    (tmp_path / "plain").write_text("")  # readable as any file made here (others read it on the volume)
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode
    assert (
        merge_parts(parts, out, by=parts[0]) and out.read_bytes() == merged
    )  # a tie or a restart: the same bytes
    assert theirs.read_bytes() == b"another replica's merge under way\n"
    assert sorted(p.name for p in tmp_path.glob(".out.jsonl*")) == [theirs.name]  # no temporary left


def test_a_replica_restarted_after_its_last_commit_still_merges(model: Path, tmp_path: Path) -> None:
    """The last replica to finish died between its last commit (``done``) and the merge (or the merge
    failed: a full volume): every restart then found its part done and exited 0 at once, and the job
    succeeded with no output."""
    from conveyor.env import PodEnv, pod_environ
    from conveyor.inference.job import pending_work

    spec, parts = replica_parts(tmp_path, model)
    out = tmp_path / "out.jsonl"
    pod = PodEnv.from_environ(
        pod_environ(
            job="s", spec=parse_spec(spec), replica=1, stage=0, master_addr="127.0.0.1", master_port=1
        )
    )
    results = ResultLog(tmp_path / "out.jsonl.r1", job_identity(pod.spec))
    state = pending_work(pod, results, out, None, None)
    results.unlock()
    assert state["done"] and state["requests"] == []
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 1]


def test_a_replicas_pod_passes_its_pre_flight_while_another_replica_runs(model: Path, tmp_path: Path) -> None:
    """In a cluster each pod checks before its ranks start (``conveyor worker``), and the operator
    restarts one replica's pods while the others run, or starts a replica's pods later than another's.
    The checks probed every replica's part lock, so a replica started while another wrote its part was
    refused (exit 2: the operator fails the whole job). Each pod probes its own part only."""
    from conveyor.env import PodEnv, pod_environ
    from conveyor.worker import Refused, check_preflight

    spec = spec_dict(tmp_path, model)
    spec["parallelism"]["replicas"] = 2

    def pod(replica: int) -> PodEnv:
        return PodEnv.from_environ(
            pod_environ(
                job="s",
                spec=parse_spec(spec),
                replica=replica,
                stage=0,
                master_addr="127.0.0.1",
                master_port=1,
            )
        )

    running = ResultLog(tmp_path / "out.jsonl.r0")
    running.lock(merged=tmp_path / "out.jsonl")  # as replica 0's writing rank holds it
    check_preflight(pod(1))
    with pytest.raises(Refused, match="out.jsonl.r0 is being written by another run"):
        check_preflight(pod(0))  # a second run of replica 0 is still refused
    running.unlock()


@pytest.mark.parametrize("lose", ["deleted", "cut"])
def test_a_finished_job_whose_results_were_lost_is_refused_not_reported_complete(
    model: Path, tmp_path: Path, lose: str
) -> None:
    """A run of a finished job found ``done`` in the record and exited 0, "already complete", even when
    the output it records had been deleted or cut: the job succeeded again with its results gone (an
    unfinished job's restart refuses the same output). So does a merge of parts that lost theirs."""
    from conveyor.env import PodEnv, pod_environ
    from conveyor.inference.job import pending_work

    spec = spec_dict(tmp_path, model)
    identity = job_identity(parse_spec(spec))
    done = ResultLog(tmp_path / "out.jsonl", identity)
    done.open()
    done.append({"id": 0, "output_ids": [1], "text": "", "finish_reason": "length"})
    done.commit(done=True)
    done.close()
    out = tmp_path / "out.jsonl"
    out.unlink() if lose == "deleted" else out.write_bytes(out.read_bytes()[:5])
    pod = PodEnv.from_environ(
        pod_environ(
            job="s", spec=parse_spec(spec), replica=0, stage=0, master_addr="127.0.0.1", master_port=1
        )
    )
    results = ResultLog(out, identity)
    state = pending_work(pod, results, out, None, None)
    results.unlock()
    why = "is gone" if lose == "deleted" else "was cut or replaced"
    assert "done" not in state and why in state["error"]
    with pytest.raises(ResultsError, match=why):
        preflight(parse_spec(spec))  # before any rank starts

    _, parts = replica_parts(tmp_path, model)
    (tmp_path / "out.jsonl.r1").unlink()
    with pytest.raises(ResultsError, match="out.jsonl.r1 is gone"):
        merge_parts(parts, tmp_path / "merged.jsonl", by=parts[0])
    assert not (tmp_path / "merged.jsonl").exists()


def test_parts_of_different_jobs_are_never_merged(model: Path, tmp_path: Path) -> None:
    """Each replica checks only its own part's record against the job. A replica that first started
    after the input was changed (a typo fixed while the job started) wrote its part for the new input,
    the others theirs for the old one, and the merge mixed them: each replica takes every R-th line,
    so prompts were dropped or computed twice."""
    spec, parts = replica_parts(tmp_path, model)
    (tmp_path / "in.jsonl").write_text('{"id": 0, "input_ids": [4, 9, 11]}\n{"id": 1, "input_ids": [5]}\n')
    spec["parallelism"]["replicas"] = 2
    later = ResultLog(tmp_path / "out.jsonl.r1", job_identity(parse_spec(spec)))
    (tmp_path / "out.jsonl.r1").unlink()
    (tmp_path / "out.jsonl.r1.progress.json").unlink()
    later.record = {"committedBytes": 0, "completed": 0, "done": False}
    later.open()
    later.append({"id": 1, "output_ids": [2], "text": "", "finish_reason": "length"})
    later.commit(done=True)
    later.close()
    with pytest.raises(ResultsError, match="hold results of different jobs .*another input file"):
        merge_parts(parts, tmp_path / "out.jsonl", by=parts[0])
    assert not (tmp_path / "out.jsonl").exists()


def test_another_tokenizer_is_another_job(model: Path, tmp_path: Path) -> None:
    """The tokenizer decides a text prompt's tokens and every result's text, but was no part of the
    identity: a job resumed after its tokenizer files were replaced mixed results of both tokenizers.
    A record written before it was part of the identity still resumes."""
    import hashlib
    import shutil

    copy = Path(shutil.copytree(model, tmp_path / "model"))
    spec = spec_dict(tmp_path, copy)
    identity = job_identity(parse_spec(spec))
    committed_log(tmp_path, identity)
    tokenizer = copy / "tokenizer.json"
    original = tokenizer.read_bytes()
    tokenizer.write_bytes(original.replace(b'"unk_token"', b'"unk_token" ', 1) + b"\n")
    with pytest.raises(ResultsError, match="holds results of another job .*another tokenizer"):
        ResultLog(tmp_path / "out.jsonl", job_identity(parse_spec(spec))).check()

    tokenizer.write_bytes(original)
    record_path = tmp_path / "out.jsonl.progress.json"
    record = json.loads(record_path.read_text())

    def write_record_from_before(**settings: object) -> None:
        job = {k: v for k, v in identity.items() if k not in ("tokenizer", "digest")}
        job["settings"] = {**job["settings"], **settings}
        job["digest"] = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
        record_path.write_text(json.dumps({**record, "job": job}))

    write_record_from_before()
    ResultLog(tmp_path / "out.jsonl", job_identity(parse_spec(spec))).check()
    write_record_from_before(maxNewTokens=9)  # (still another job where it is one)
    with pytest.raises(ResultsError, match="maxNewTokens 9"):
        ResultLog(tmp_path / "out.jsonl", job_identity(parse_spec(spec))).check()


def test_a_tokenizer_file_added_to_the_model_is_another_job(model: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(model, tmp_path / "model"))
    (copy / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    spec = spec_dict(tmp_path, copy)
    committed_log(tmp_path, job_identity(parse_spec(spec)))
    (tmp_path / "tokenizer.json").rename(copy / "tokenizer.json")
    with pytest.raises(ResultsError, match="another tokenizer"):
        ResultLog(tmp_path / "out.jsonl", job_identity(parse_spec(spec))).check()


def test_a_committed_line_that_is_no_longer_a_result_is_refused_in_one_line(
    model: Path, tmp_path: Path
) -> None:
    """An output edited by hand (a line reformatted, an id removed) failed the writing rank with a
    JSONDecodeError or KeyError traceback, restarted until the backoff limit."""
    identity = job_identity(parse_spec(spec_dict(tmp_path, model)))
    committed_log(tmp_path, identity)
    out = tmp_path / "out.jsonl"
    lines = out.read_bytes().splitlines(keepends=True)
    for edited, why in (
        (b"{'id': 1" + b" " * (len(lines[1]) - 9) + b"\n", "not JSON"),
        (b"{}" + b" " * (len(lines[1]) - 3) + b"\n", 'no "id"'),
    ):
        out.write_bytes(lines[0] + edited + lines[2])
        with pytest.raises(ResultsError, match=f"out.jsonl:2: committed line is not a result \\({why}"):
            ResultLog(out, identity).committed_ids()


def test_a_writer_killed_before_its_first_commit_is_resumed_not_refused(model: Path, tmp_path: Path) -> None:
    """The writer appends a result (flushed: visible at once) and commits it on another thread a moment
    later. Killed in between on its first result, it left an output that held bytes and no progress record
    yet: every restart refused it as another job's (exit 2), and the job could not go on."""
    from conveyor.env import PodEnv, pod_environ
    from conveyor.inference.job import pending_work
    from conveyor.inference.model.families import load_arch

    spec, arch = parse_spec(spec_dict(tmp_path, model)), load_arch(model)
    pod = PodEnv.from_environ(
        pod_environ(job="s", spec=spec, replica=0, stage=0, master_addr="127.0.0.1", master_port=1)
    )
    out = tmp_path / "out.jsonl"
    first = ResultLog(out, job_identity(spec))
    assert pending_work(pod, first, out, None, arch)["requests"]
    first.open()
    first.append({"id": 0, "output_ids": [1], "text": "", "finish_reason": "length"})
    first.unlock()  # killed here: before the commit thread wrote the record
    assert out.stat().st_size

    restart = ResultLog(out, job_identity(spec))
    state = pending_work(pod, restart, out, None, arch)
    restart.unlock()
    assert "error" not in state, state["error"]
    assert sorted(r.id for r in state["requests"]) == [0, 1, 2, 3]  # the uncommitted result computed again
    assert out.read_bytes() == b""  # its line dropped, as any uncommitted tail


def test_a_writers_start_removes_the_temporary_files_its_killed_writer_left(
    model: Path, tmp_path: Path
) -> None:
    """A writer killed while it wrote its progress record, or while it merged the replicas' parts (a copy
    of every result), left the temporary file beside the output for ever: each had a name of its own
    (the pid, a uuid), so no later run knew it for a leftover. Only the holder of a part's lock writes
    that part's temporaries, so its next writer removes them; another replica's are left alone."""
    _, parts = replica_parts(tmp_path, model)
    left = [parts[1].merge_temporary, tmp_path / ".out.jsonl.r1.progress.json.4242.tmp"]
    running = [parts[0].merge_temporary, tmp_path / ".out.jsonl.r0.progress.json.4242.tmp"]  # replica 0's
    for path in left + running:
        path.write_bytes(b"partial\n")
    restarted = ResultLog(tmp_path / "out.jsonl.r1")
    restarted.lock(merged=tmp_path / "out.jsonl")
    restarted.unlock()
    assert [p.exists() for p in left + running] == [False, False, True, True]


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("change", ["append", "edit"])
def test_an_input_changed_between_a_kill_and_the_restart_is_refused_naming_it(
    model: Path, tmp_path: Path, change: str, replicas: int
) -> None:
    """A rank killed with results committed, the input then changed (a line appended, one edited),
    and the group restarted: its writer refuses in one line that names the input file, and leaves the
    output as it was (the prompts are every R-th line: mixing old and new results would drop or repeat
    some)."""
    from conveyor.env import PodEnv, pod_environ
    from conveyor.inference.job import pending_work
    from conveyor.inference.model.families import load_arch

    raw = spec_dict(tmp_path, model)
    raw["parallelism"]["replicas"] = replicas
    spec, arch = parse_spec(raw), load_arch(model)
    pod = PodEnv.from_environ(
        pod_environ(job="s", spec=spec, replica=0, stage=0, master_addr="127.0.0.1", master_port=1)
    )
    out, part = tmp_path / "out.jsonl", tmp_path / ("out.jsonl" if replicas == 1 else "out.jsonl.r0")
    first = ResultLog(part, job_identity(spec))
    assert len(pending_work(pod, first, out, None, arch)["requests"]) == 4 // replicas
    first.open()
    first.append({"id": 0, "output_ids": [1], "text": "", "finish_reason": "length"})
    first.commit()
    first.unlock()  # killed here
    before = part.read_bytes()

    prompts = tmp_path / "in.jsonl"
    lines = prompts.read_text().splitlines(keepends=True)
    if change == "append":
        lines.append(json.dumps({"id": 4, "input_ids": [3, 9, 11]}) + "\n")
    else:
        lines[2] = lines[2].replace("[7, 9, 11]", "[7, 9, 12]")
    prompts.write_text("".join(lines))

    restart = ResultLog(part, job_identity(spec))
    state = pending_work(pod, restart, out, None, arch)
    restart.unlock()
    assert "\n" not in state["error"]
    assert f"{part} holds results of another job" in state["error"]
    assert f"another input file ({prompts} changed" in state["error"]
    assert part.read_bytes() == before and not (replicas > 1 and out.exists())
    with pytest.raises(ResultsError, match=f"another input file \\({prompts} changed"):
        preflight(spec)  # `conveyor run` started again: refused before any rank starts


def test_an_input_changed_while_a_replica_starts_is_refused_not_split_anew(
    model: Path, tmp_path: Path
) -> None:
    """The writer takes the job's identity (the input's digest among it) as its rank starts and reads its
    share of the prompts a moment later, after the model's config and tokenizer. A line inserted at the
    top in between: its share (every R-th line) was the new input's and its record said the old one, so
    the merge took it with the other replica's share of the old input: old prompts twice, others never."""
    from conveyor.env import PodEnv, pod_environ
    from conveyor.inference.job import pending_work
    from conveyor.inference.model.families import load_arch

    raw = spec_dict(tmp_path, model)
    raw["parallelism"]["replicas"] = 2
    spec, arch = parse_spec(raw), load_arch(model)
    pod = PodEnv.from_environ(
        pod_environ(job="s", spec=spec, replica=0, stage=0, master_addr="127.0.0.1", master_port=1)
    )
    results = ResultLog(tmp_path / "out.jsonl.r0", job_identity(spec))  # as the rank starts
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"id": "new", "input_ids": [3]}) + "\n" + prompts.read_text())
    state = pending_work(pod, results, tmp_path / "out.jsonl", None, arch)
    results.unlock()
    assert f"{prompts} changed while the job started" in state["error"] and "\n" not in state["error"]
    assert not (tmp_path / "out.jsonl.r0.progress.json").exists()
