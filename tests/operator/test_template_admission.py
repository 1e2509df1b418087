"""spec.template items that reuse a key of the operator's own rendering, or one key twice, are refused
by the spec model (and, as CEL and list-map keys, by the CRD: test_crd_admission.py), each naming the
item and the fix; and the model's idea of the operator's keys is the operator's rendering."""

from __future__ import annotations

from typing import Any

import pytest
from conveyor import template_keys
from conveyor.spec import SpecError, parse_spec
from conveyor_operator import render

from tests.operator.builders import inference_spec, serve_spec, train_spec

MOUNT = {"volumes": [{"name": "data", "emptyDir": {}}]}

# (case, spec, a part of the message)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    (
        "an env var the operator sets",
        inference_spec(template={"env": [{"name": "HF_HOME", "value": "/hf"}, {"name": "MASTER_PORT"}]}),
        "spec.template.env[1].name: 'MASTER_PORT' is set by the operator: remove it "
        '(docs/design.md, "Worker environment")',
    ),
    (
        "a train job's torchrun variable",
        train_spec(template={"env": [{"name": "WORLD_SIZE", "value": "4"}]}),
        "spec.template.env[0].name: 'WORLD_SIZE' is set by the operator",
    ),
    (
        "the checkpoint directory",
        inference_spec(template={"env": [{"name": "CONVEYOR_CHECKPOINT_DIR", "value": "/x"}]}),
        "spec.template.env[0].name: 'CONVEYOR_CHECKPOINT_DIR' is set by the operator",
    ),
    (
        "the hang timeout, when the operator sets it",
        inference_spec(
            failurePolicy={"hangTimeoutSeconds": 60}, template={"env": [{"name": "CONVEYOR_HANG_TIMEOUT"}]}
        ),
        "spec.template.env[0].name: 'CONVEYOR_HANG_TIMEOUT' is set by the operator",
    ),
    (
        "the compile cache's volume name",
        serve_spec(cache={}, template={"volumes": [{"name": "compile-cache", "emptyDir": {}}]}),
        "spec.template.volumes[0].name: 'compile-cache' is the name of the operator's own volume: rename it, "
        "and its volumeMounts",
    ),
    (
        "the shared memory volume's name",
        serve_spec(template={"volumes": [{"name": "dshm", "emptyDir": {}}]}),
        "spec.template.volumes[0].name: 'dshm' is the name of the operator's own volume",
    ),
    (
        "a mount at the checkpoint's path",
        inference_spec(template={**MOUNT, "volumeMounts": [{"name": "data", "mountPath": "/ckpt"}]}),
        "spec.template.volumeMounts[0].mountPath: '/ckpt' is where the operator mounts its volume "
        "'checkpoint': choose another mountPath",
    ),
    (
        "a mount on shared memory",
        serve_spec(template={**MOUNT, "volumeMounts": [{"name": "data", "mountPath": "/dev/shm"}]}),
        "spec.template.volumeMounts[0].mountPath: '/dev/shm' is where the operator mounts its volume 'dshm'",
    ),
    (
        "an env var twice",
        serve_spec(template={"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}),
        "spec.template.env[1].name: 'A' is set twice in spec.template.env: keep one",
    ),
    (
        "a volume twice",
        serve_spec(template={"volumes": [{"name": "data", "emptyDir": {}}, {"name": "data"}]}),
        "spec.template.volumes[1].name: 'data' is set twice in spec.template.volumes: keep one",
    ),
    (
        "a mount path twice",
        serve_spec(
            template={
                **MOUNT,
                "volumeMounts": [{"name": "data", "mountPath": "/d"}, {"name": "data", "mountPath": "/d"}],
            }
        ),
        "spec.template.volumeMounts[1].mountPath: '/d' is set twice in spec.template.volumeMounts: keep one",
    ),
    (
        "a pull secret twice",
        serve_spec(template={"imagePullSecrets": [{"name": "regcred"}, {"name": "regcred"}]}),
        "spec.template.imagePullSecrets[1].name: 'regcred' is set twice in spec.template.imagePullSecrets",
    ),
    (
        "an env var without a name",
        serve_spec(template={"env": [{"value": "1"}]}),
        "spec.template.env[0].name: missing or not a string: add it",
    ),
    (
        "a mount without a path",
        serve_spec(template={**MOUNT, "volumeMounts": [{"name": "data"}]}),
        "spec.template.volumeMounts[0].mountPath: missing or not a string: add it",
    ),
]


@pytest.mark.parametrize(("case", "spec", "message"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_template_item_the_apply_would_see_twice_is_refused_by_the_model(
    case: str, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert message in str(err.value), f"{case}: {err.value}"


def test_keys_the_operator_does_not_render_for_this_spec_are_the_user_s() -> None:
    parse_spec(inference_spec(template={"env": [{"name": "CONVEYOR_HANG_TIMEOUT", "value": "60"}]}))
    parse_spec(inference_spec(template={"env": [{"name": "WORLD_SIZE", "value": "4"}]}))  # train only
    parse_spec(serve_spec(template={"env": [{"name": "CONVEYOR_CHECKPOINT_DIR", "value": "/c"}]}))
    parse_spec(serve_spec(template={**MOUNT, "volumeMounts": [{"name": "data", "mountPath": "/ckpt"}]}))
    # A model read from the template's own volume: the operator mounts nothing at model.mountPath.
    mount = {**MOUNT, "volumeMounts": [{"name": "data", "mountPath": "/models"}]}
    parse_spec(serve_spec(model={"path": "/models/llama"}, template=mount))


# The spec shapes that change which keys the operator renders.
SHAPES = [
    inference_spec(),
    inference_spec(checkpoint=None, model={"path": "/m"}, failurePolicy={"hangTimeoutSeconds": 60}),
    train_spec(cache={"volume": "cache", "path": "/cache"}),
    serve_spec(cache={}, model={"path": "/m", "volume": "m", "mountPath": "/weights"}),
    serve_spec(checkpoint={"path": "/c"}, tp=4),
]


@pytest.mark.parametrize("raw", SHAPES)
def test_the_model_s_operator_keys_are_those_the_operator_renders(raw: dict[str, Any]) -> None:
    spec = parse_spec({k: v for k, v in raw.items() if v is not None})
    pod = render.placeholder_pod(spec)
    container = pod["containers"][0]
    assert set(template_keys.operator_env(spec)) == {e["name"] for e in container["env"]}
    assert set(template_keys.operator_volumes(spec)) == {v["name"] for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert template_keys.operator_mounts(spec) == mounts
