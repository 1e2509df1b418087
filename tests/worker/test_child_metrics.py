"""A spec.train.command program's metrics reach its rank's /metrics: the program's engine writes its
``conveyor_`` families to a file, and the rank serves them merged into its own registry, one family per
name (the rank defines the same metrics without values; a name twice would fail Prometheus' scrape)."""

from __future__ import annotations

from conveyor import metrics
from conveyor.utils import free_port
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from tests.worker.test_readiness import get


def registry_like_a_rank() -> tuple[CollectorRegistry, Gauge, Counter]:
    registry = CollectorRegistry()
    loss = Gauge("conveyor_loss", "Mean loss.", ["job"], registry=registry)
    tokens = Counter("conveyor_tokens_generated", "Tokens.", ["job"], registry=registry)
    Gauge("process_thing", "Not Conveyor's.", registry=registry).set(7)
    return registry, loss, tokens


def test_the_childs_values_are_served_in_the_ranks_families(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rank, _, rank_tokens = registry_like_a_rank()
    rank_tokens.labels("job").inc(2)  # the rank's own values stay
    program, loss, tokens = registry_like_a_rank()
    loss.labels("job").set(1.25)
    tokens.labels("other").inc(5)
    metrics._Exporter(str(tmp_path / "metrics"), program).write()
    assert "process_thing" not in (tmp_path / "metrics").read_text()  # the rank has its own

    child = metrics.ChildMetrics()
    child.watch(tmp_path / "metrics")
    port = free_port()
    assert metrics.serve(port, registry=rank, readiness=metrics.Readiness(), child=child)
    status, text = get(port, "/metrics")
    assert status == 200
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names))  # one family per name (a counter's _created is its own here)
    assert set(names) == {
        "conveyor_loss",
        "conveyor_tokens_generated",
        "conveyor_tokens_generated_created",
        "process_thing",
    }
    samples = {(s.name, tuple(s.labels.items())): s.value for f in families for s in f.samples}
    assert samples[("conveyor_loss", (("job", "job"),))] == 1.25
    assert samples[("conveyor_tokens_generated_total", (("job", "job"),))] == 2
    assert samples[("conveyor_tokens_generated_total", (("job", "other"),))] == 5
    assert samples[("process_thing", ())] == 7
    assert text.count("# TYPE conveyor_loss ") == 1

    status, text = get(port, "/metrics?name[]=conveyor_loss")  # a scrape that names what it wants
    assert [f.name for f in text_string_to_metric_families(text)] == ["conveyor_loss"]


def test_before_the_child_writes_the_rank_serves_its_own(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rank, loss, _ = registry_like_a_rank()
    loss.labels("job").set(3)
    child = metrics.ChildMetrics()
    child.watch(tmp_path / "metrics")
    port = free_port()
    assert metrics.serve(port, registry=rank, readiness=metrics.Readiness(), child=child)
    status, text = get(port, "/metrics")
    assert status == 200 and 'conveyor_loss{job="job"} 3.0' in text
    (tmp_path / "metrics").write_text("not metrics {\n")  # a file some other program wrote
    status, text = get(port, "/metrics")
    assert status == 200 and 'conveyor_loss{job="job"} 3.0' in text


def test_writes_are_at_most_once_a_second(tmp_path) -> None:  # type: ignore[no-untyped-def]
    program, loss, _ = registry_like_a_rank()
    exporter = metrics._Exporter(str(tmp_path / "metrics"), program)
    loss.labels("job").set(1)
    exporter.maybe_write()
    loss.labels("job").set(2)
    exporter.maybe_write()  # within the second: held back (a step can take milliseconds)
    assert 'conveyor_loss{job="job"} 1.0' in (tmp_path / "metrics").read_text()
    exporter.write()  # as at exit
    assert 'conveyor_loss{job="job"} 2.0' in (tmp_path / "metrics").read_text()
