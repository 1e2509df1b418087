"""The generated CRD: equal to the checked-in files, structural, small, with the rules, columns and
subresources the API needs."""

from __future__ import annotations

import subprocess
from typing import Any

import yaml
from conveyor import admission_rules, crd, spec

from tests.conftest import ROOT, conveyor_cmd, subprocess_env


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.items():
            out += _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _walk(value, f"{path}[{i}]")
    return out


def test_checked_in_crds_equal_the_generated_ones() -> None:
    assert crd.drift(ROOT) == [], "run `conveyor crd --write` (or `make crds`) and commit crds/ and the chart"
    for directory in crd.CRD_DIRS:
        assert (ROOT / directory / crd.CRD_FILE).read_text() == (ROOT / "crds" / crd.CRD_FILE).read_text()


def test_check_flag_exits_one_on_drift(tmp_path: Any) -> None:
    ok = subprocess.run(
        conveyor_cmd("crd", "--check"), env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert crd.drift(tmp_path) != []  # an empty tree has no CRDs: that is drift too
    crd.write(tmp_path)
    assert crd.drift(tmp_path) == []
    (tmp_path / "crds" / crd.CRD_FILE).write_text("# edited by hand\n")
    assert crd.drift(tmp_path) == ["crds/" + crd.CRD_FILE]


def test_well_under_the_annotation_limit() -> None:
    size = len((ROOT / "crds" / crd.CRD_FILE).read_bytes())
    assert size < 64 * 1024, f"{size} bytes: client-side apply stores the CRD in a 256 KiB annotation"


def test_schema_is_structural() -> None:
    schema = crd.pipelinejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert not {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const"} & set(node), path
        if "properties" in node:
            assert node.get("type") == "object" and "additionalProperties" not in node, path
        if path.endswith(".properties") or path.endswith("x-kubernetes-validations"):
            continue
        if any(k in node for k in ("minimum", "maxLength", "enum", "items")):
            assert "type" in node, path
    spec_props = schema["properties"]["spec"]["properties"]
    assert spec_props["parallelism"]["default"] == {}  # nested defaults filled by the API server
    assert spec_props["parallelism"]["properties"]["stages"]["default"] == 1
    assert spec_props["template"]["properties"]["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "default" not in spec_props["checkpoint"]  # optional sections stay absent
    assert spec_props["inference"]["properties"]["sampling"]["properties"]["topP"]["exclusiveMinimum"] is True


def test_cel_rules_and_messages_are_carried() -> None:
    schema = crd.pipelinejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = schema["properties"]["spec"]["x-kubernetes-validations"]
    assert rules == admission_rules.CEL_RULES + admission_rules.IMMUTABLE_PARALLELISM_RULES
    assert all(r["message"].startswith("spec.") or "spec." in r["message"] for r in rules)
    assert any("oldSelf.parallelism.stages" in r["rule"] for r in rules)
    root_rules = [r["rule"] for r in schema["x-kubernetes-validations"]]
    assert "self.metadata.name.size() <= 46" in root_rules
    # The Service takes the job's name (a DNS-1035 label); the API server alone allows `1llm` or `a.b`.
    assert f"self.metadata.name.matches('{spec.NAME_PATTERN}')" in root_rules


def test_checks_of_the_model_that_the_schema_can_express_are_in_it() -> None:
    # A job the model refuses should not pass `kubectl apply` where the API server could tell.
    spec_schema = crd.pipelinejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "spec"
    ]
    rule = spec_schema["properties"]["failurePolicy"]["properties"]["rules"]["items"]
    assert rule["properties"]["onExitCodes"]["items"]["pattern"]
    assert "has(self.onExitCodes)" in rule["x-kubernetes-validations"][0]["rule"]
    assert spec_schema["properties"]["placement"]["properties"]["topologyKey"]["pattern"]
    messages = " ".join(r["message"] for r in spec_schema["x-kubernetes-validations"])
    assert "spec.train.steps is required" in messages and "spec.train.globalBatchSize" in messages


def test_names_columns_and_subresources() -> None:
    doc = yaml.safe_load((ROOT / "crds" / crd.CRD_FILE).read_text())
    assert doc["metadata"]["name"] == "pipelinejobs.conveyor.dev"
    assert doc["spec"]["names"]["shortNames"] == ["plj"]
    version = doc["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.parallelism.replicas"
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Mode", "Layout", "Phase", "Ready", "Restarts", "Checkpoint", "Age"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for path in (
        "layout",
        "phase",
        "ready",
        "restarts",
        "lastCheckpoint",
        "replicas",
        "selector",
        "conditions",
    ):
        assert path in status


def test_peering_crds_for_leader_election() -> None:
    docs = list(yaml.safe_load_all((ROOT / "crds" / crd.PEERING_FILE).read_text()))
    assert sorted(d["spec"]["names"]["kind"] for d in docs) == ["ClusterKopfPeering", "KopfPeering"]
    assert {d["spec"]["group"] for d in docs} == {"kopf.dev"}
