"""A training step reaches the worker's Prometheus metrics, read back through the public registry as the
/metrics endpoint serves them (one process, one stage)."""

from __future__ import annotations

import conveyor
import pytest
from conveyor.pipe import PipelineModule
from prometheus_client import REGISTRY

from tests.worker.pipe.models import config, lm_loss, make_data, tied_layers


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0  # None before the first observation


def test_each_training_step_publishes_loss_step_time_and_bubble():
    job = "metrics-test"
    net = PipelineModule(tied_layers(), loss_fn=lm_loss)
    engine, _, _, _ = conveyor.initialize(model=net, config=config(2, 1), job=job)
    for step, batch in enumerate(make_data(2, 2), start=1):
        counted, total = (
            sample("conveyor_step_seconds_count", job=job),
            sample("conveyor_step_seconds_sum", job=job),
        )
        waited = sample("conveyor_pipeline_bubble_seconds_total", job=job, stage="0")
        loss = float(engine.train_batch(iter(batch)))

        assert sample("conveyor_loss", job=job) == pytest.approx(loss, rel=1e-6)
        assert sample("conveyor_train_step", job=job) == step
        assert sample("conveyor_step_seconds_count", job=job) == counted + 1
        # the step's own time and wait, not a total of earlier steps or another job's
        stats = engine.last_stats
        assert sample("conveyor_step_seconds_sum", job=job) - total == pytest.approx(stats["step_seconds"])
        bubble = sample("conveyor_pipeline_bubble_seconds_total", job=job, stage="0") - waited
        assert bubble == pytest.approx(stats["wait_seconds"])
