"""Pipeline schedules as data: one list of steps per stage, checked offline before anything runs.

An ``Action`` is ``(stage, kind, micro_batch)`` and prints as ``2F0`` (stage 2, forward of micro-batch 0),
``1SF3`` (stage 1 sends micro-batch 3's activations), ``0RB1`` (stage 0 receives micro-batch 1's
gradients). A *step* is a tuple of actions: one compute action, or the communication actions that the
runtime posts together in one ``batch_isend_irecv`` (p2p.py). Sending a forward and receiving the next
gradient in one batch is what keeps 1F1B free of deadlocks when a send only completes once its receive
is posted (NCCL).

``build_schedule`` -> per-stage compute order -> ``add_communication`` -> ``validate`` (every send meets
its receive in order, each micro-batch's forward before its backward, and a simulation that proves no
rank waits forever) -> ``format_grid`` (step x rank, with where each rank stopped).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from enum import StrEnum

SCHEDULES = ("1f1b", "gpipe")


class Kind(StrEnum):
    FORWARD = "F"
    BACKWARD = "B"
    SEND_F = "SF"  # activations to stage + 1
    RECV_F = "RF"  # activations from stage - 1
    SEND_B = "SB"  # gradients to stage - 1
    RECV_B = "RB"  # gradients from stage + 1


COMPUTE = (Kind.FORWARD, Kind.BACKWARD)


@dataclass(frozen=True)
class Action:
    stage: int
    kind: Kind
    micro_batch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.micro_batch}"

    @property
    def peer(self) -> int | None:
        """The stage on the other end of a communication action."""
        if self.kind in (Kind.SEND_F, Kind.RECV_B):
            return self.stage + 1
        if self.kind in (Kind.RECV_F, Kind.SEND_B):
            return self.stage - 1
        return None

    @property
    def is_send(self) -> bool:
        return self.kind in (Kind.SEND_F, Kind.SEND_B)

    @property
    def channel(self) -> tuple[int, int, str]:
        """(src, dst, what): sends and receives on one channel must match one to one, in order."""
        assert self.peer is not None
        what = "act" if self.kind in (Kind.SEND_F, Kind.RECV_F) else "grad"
        return (self.stage, self.peer, what) if self.is_send else (self.peer, self.stage, what)


Step = tuple[Action, ...]
Schedule = list[list[Step]]  # schedule[stage] = that stage's steps, in order


class ScheduleError(ValueError):
    """A schedule that would compute wrongly or deadlock; the message holds the grid."""


def compute_order(name: str, stages: int, micro_batches: int, stage: int) -> list[Action]:
    """The forward/backward order of one stage. ``forward`` is the forward-only order of eval."""
    m = micro_batches
    fwd = [Action(stage, Kind.FORWARD, i) for i in range(m)]
    bwd = [Action(stage, Kind.BACKWARD, i) for i in range(m)]
    if name == "forward":
        return fwd
    if name == "gpipe":
        return fwd + bwd
    if name == "1f1b":
        # Stage s runs (stages - s - 1) forwards ahead, then alternates one forward, one backward, so at
        # most (stages - s) micro-batches' activations are alive at once (GPipe keeps all m).
        warmup = min(stages - stage - 1, m)
        order = fwd[:warmup]
        for i in range(m - warmup):
            order += [fwd[warmup + i], bwd[i]]
        return order + bwd[m - warmup :]
    raise ScheduleError(f"unknown pipeline schedule {name!r}: use one of {', '.join(SCHEDULES)}")


def add_communication(compute: list[list[Action]], stages: int) -> Schedule:
    """Insert the sends and receives each compute action needs, merging adjacent ones into one step."""
    schedule: Schedule = []
    for stage, order in enumerate(compute):
        flat: list[Action] = []
        for act in order:
            mb = act.micro_batch
            if act.kind == Kind.FORWARD:
                if stage > 0:
                    flat.append(Action(stage, Kind.RECV_F, mb))
                flat.append(act)
                if stage < stages - 1:
                    flat.append(Action(stage, Kind.SEND_F, mb))
            else:
                if stage < stages - 1:
                    flat.append(Action(stage, Kind.RECV_B, mb))
                flat.append(act)
                if stage > 0:
                    flat.append(Action(stage, Kind.SEND_B, mb))
        steps: list[Step] = []
        pending: list[Action] = []
        for act in flat:
            if act.kind in COMPUTE:
                if pending:
                    steps.append(tuple(pending))
                    pending = []
                steps.append((act,))
            else:
                pending.append(act)
        if pending:
            steps.append(tuple(pending))
        schedule.append(steps)
    return schedule


def build_schedule(name: str, stages: int, micro_batches: int) -> Schedule:
    """The validated per-stage schedule; ``name`` is ``1f1b``, ``gpipe`` or ``forward`` (eval)."""
    if stages < 1 or micro_batches < 1:
        raise ScheduleError(f"need stages >= 1 and micro_batches >= 1, got {stages} and {micro_batches}")
    compute = [compute_order(name, stages, micro_batches, s) for s in range(stages)]
    schedule = add_communication(compute, stages)
    validate(schedule, micro_batches, training=name != "forward")
    return schedule


def format_grid(schedule: Schedule, positions: dict[int, int | None] | None = None) -> str:
    """Step x rank table; ``positions[stage]`` marks the step that stage was at with ``>``
    (None: unknown, e.g. a rank that crashed)."""
    positions = positions or {}
    cells = [["+".join(str(a) for a in step) for step in steps] for steps in schedule]
    width = max([len(c) for col in cells for c in col] + [8]) + 2
    rows = ["step | " + "".join(f"stage {s}".ljust(width) for s in range(len(schedule)))]
    if positions:
        where = ["?" if positions.get(s) is None else f"@{positions[s]}" for s in range(len(schedule))]
        rows.append("at   | " + "".join(w.ljust(width) for w in where))
    for i in range(max(len(c) for c in cells)):
        line = []
        for s, col in enumerate(cells):
            text = col[i] if i < len(col) else ""
            mark = ">" if positions.get(s) == i else " "
            line.append((mark + text).ljust(width))
        rows.append(f"{i:4d} | " + "".join(line))
    return "\n".join(rows)


def validate(schedule: Schedule, micro_batches: int, training: bool = True) -> None:
    """Raise ScheduleError unless the schedule computes every micro-batch once, in a valid order, and
    runs to the end when every communication step waits for all of its partners (the strictest
    semantics: a send completes only once the matching receive is posted)."""
    problems = [
        *(
            p
            for stage in range(len(schedule))
            for p in _stage_problems(schedule, stage, micro_batches, training)
        ),
        *_channel_problems(schedule),
    ]
    if problems:
        raise ScheduleError(
            "invalid pipeline schedule:\n  " + "\n  ".join(problems) + "\n" + format_grid(schedule)
        )
    positions = simulate(schedule)
    if any(pos is not None for pos in positions.values()):
        raise ScheduleError(
            "pipeline schedule deadlocks: no rank can make progress at the marked steps\n"
            + format_grid(schedule, positions)
        )


# What must have run on the same stage before an action of each kind, and whether it applies there
# (a first stage receives no activations, a last stage no gradients).
def _prerequisites(kind: Kind, stage: int, stages: int) -> list[Kind]:
    needs = {
        Kind.FORWARD: [(Kind.RECV_F, stage > 0)],
        Kind.BACKWARD: [(Kind.FORWARD, True), (Kind.RECV_B, stage < stages - 1)],
        Kind.SEND_F: [(Kind.FORWARD, True)],
        Kind.SEND_B: [(Kind.BACKWARD, True)],
        Kind.RECV_F: [],
        Kind.RECV_B: [(Kind.FORWARD, True)],
    }[kind]
    return [need for need, applies in needs if applies]


def _stage_problems(schedule: Schedule, stage: int, micro_batches: int, training: bool) -> list[str]:
    """One stage's own mistakes: malformed steps, foreign or peerless actions, an action before what it
    needs or twice, and work never done."""
    stages = len(schedule)
    problems: list[str] = []
    done: set[tuple[Kind, int]] = set()
    for i, step in enumerate(schedule[stage]):
        kinds = {a.kind in COMPUTE for a in step}
        if len(kinds) != 1 or (True in kinds and len(step) != 1):
            problems.append(f"stage {stage} step {i}: a step is one compute action or only communication")
        for act in step:
            if act.stage != stage:
                problems.append(f"stage {stage} step {i}: {act} belongs to stage {act.stage}")
            if act.kind not in COMPUTE and not _has_peer(act, stages):
                problems.append(f"stage {stage} step {i}: {act} has no peer stage")
                continue
            for need in _prerequisites(act.kind, stage, stages):
                if (need, act.micro_batch) not in done:
                    problems.append(
                        f"stage {stage} step {i}: {act} before {stage}{need.value}{act.micro_batch}"
                    )
            if (act.kind, act.micro_batch) in done:
                problems.append(f"stage {stage} step {i}: {act} appears twice")
            done.add((act.kind, act.micro_batch))
    wanted = {(Kind.FORWARD, mb) for mb in range(micro_batches)}
    if training:
        wanted |= {(Kind.BACKWARD, mb) for mb in range(micro_batches)}
    missing = sorted(f"{stage}{k.value}{mb}" for k, mb in wanted - done)
    if missing:
        problems.append(f"stage {stage}: never runs {', '.join(missing)}")
    return problems


def _has_peer(act: Action, stages: int) -> bool:
    return act.peer is not None and 0 <= act.peer < stages


def _channel_problems(schedule: Schedule) -> list[str]:
    """Each channel's sends and receives must name the same micro-batches in the same order."""
    channels: dict[tuple[int, int, str], dict[bool, list[int]]] = defaultdict(lambda: {True: [], False: []})
    for steps in schedule:
        for step in steps:
            for act in step:
                if act.kind not in COMPUTE and _has_peer(act, len(schedule)):
                    channels[act.channel][act.is_send].append(act.micro_batch)
    return [
        f"{what} channel {src}->{dst}: sends {sides[True]} do not meet receives {sides[False]} in order"
        for (src, dst, what), sides in sorted(channels.items())
        if sides[True] != sides[False]
    ]


def simulate(schedule: Schedule) -> dict[int, int | None]:
    """Run the schedule symbolically. Returns each stage's stuck step (None once finished)."""
    pos = [0] * len(schedule)
    posted: dict[tuple[int, int, str], dict[bool, int]] = defaultdict(lambda: {True: 0, False: 0})
    # index of each communication action within its channel's sequence, on its own side
    index: dict[tuple[int, int], list[int]] = {}
    counters: dict[tuple[tuple[int, int, str], bool], int] = defaultdict(int)
    for stage, steps in enumerate(schedule):
        for i, step in enumerate(steps):
            idx = []
            for act in step:
                if act.kind in COMPUTE:
                    idx.append(-1)
                else:
                    key = (act.channel, act.is_send)
                    idx.append(counters[key])
                    counters[key] += 1
            index[(stage, i)] = idx
    marked: set[tuple[int, int]] = set()
    progress = True
    while progress:
        progress = False
        for stage, steps in enumerate(schedule):
            while pos[stage] < len(steps):
                i = pos[stage]
                step = steps[i]
                if step[0].kind in COMPUTE:
                    pos[stage] += 1
                    progress = True
                    continue
                if (stage, i) not in marked:  # post every op of the batch once
                    for act in step:
                        posted[act.channel][act.is_send] += 1
                    marked.add((stage, i))
                    progress = True
                # the batch completes when every op's partner has been posted
                ready = all(
                    posted[act.channel][not act.is_send] > n for act, n in zip(step, index[(stage, i)])
                )
                if not ready:
                    break
                pos[stage] += 1
                progress = True
    return {s: (pos[s] if pos[s] < len(steps) else None) for s, steps in enumerate(schedule)}


def peak_in_flight(schedule: Schedule) -> list[int]:
    """Per stage, the most micro-batches whose forward ran and whose backward has not (live activations)."""
    peaks = []
    for steps in schedule:
        live = peak = 0
        for step in steps:
            for act in step:
                live += {Kind.FORWARD: 1, Kind.BACKWARD: -1}.get(act.kind, 0)
                peak = max(peak, live)
        peaks.append(peak)
    return peaks
