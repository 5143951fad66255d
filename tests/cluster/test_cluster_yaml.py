"""Every YAML under ``cluster/`` is checked against the schema its tool applies, plus the
octoray-specific promises (A100 node types, autoscaler v2, the entrypoint and Serve app exist).

* Ray cluster launcher files (``provider:``): Ray's own ``prepare_config`` + ``validate_config``
  (``ray/autoscaler/ray-schema.json``), the path ``ray up`` takes before it calls the cloud.
* KubeRay manifests (``apiVersion: ray.io/v1``): the CRD's ``openAPIV3Schema`` (KubeRay v1.7, in
  ``../shared/kuberay-crds``) with jsonschema, read the way the API server reads it: unknown fields
  rejected (``kubectl apply --validate=strict``), ``x-kubernetes-int-or-string``, ``nullable``,
  ``x-kubernetes-preserve-unknown-fields`` and int32/int64 ranges honoured.

Each check has a test that feeds it a broken copy and expects a rejection.
"""

from __future__ import annotations

import copy
import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO_ROOT, SHARED

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic notes from ray.serve

CLUSTER = REPO_ROOT / "cluster"
YAMLS = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
KUBERAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
                 "RayService": "ray.io_rayservices.yaml"}
#: Top-level fields of the cloud APIs a node_config is passed to (EC2 RunInstances, GCE
#: instances.insert), plus the ones Ray's providers add; anything else is a typo.
NODE_CONFIG_FIELDS = {
    "aws": {"InstanceType", "ImageId", "KeyName", "SubnetIds", "SubnetId", "SecurityGroupIds", "IamInstanceProfile",
            "BlockDeviceMappings", "InstanceMarketOptions", "TagSpecifications", "Placement", "NetworkInterfaces",
            "UserData", "EbsOptimized", "MetadataOptions", "CapacityReservationSpecification", "LaunchTemplate",
            "CpuOptions", "HibernationOptions", "Monitoring", "PrivateDnsNameOptions"},
    "gcp": {"machineType", "disks", "guestAccelerators", "scheduling", "metadata", "networkInterfaces", "labels",
            "tags", "serviceAccounts", "minCpuPlatform", "shieldedInstanceConfig", "reservationAffinity",
            "advancedMachineFeatures", "networkPerformanceConfig", "resourcePolicies", "confidentialInstanceConfig"},
}
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _load(path: Path) -> dict[str, Any]:
    # The C loader when PyYAML has it: the CRDs are megabytes of YAML.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 - a safe loader


# --- every file ----------------------------------------------------------------------------------


def test_cluster_dir_has_the_promised_files() -> None:
    names = {p.relative_to(CLUSTER).as_posix() for p in YAMLS}
    assert {"aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
            "kuberay/rayservice.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_cluster_yaml_is_valid(path: Path, shared_dir: Path) -> None:
    doc = _load(path)
    if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/"):
        problems = kuberay_problems(doc, shared_dir)
    elif isinstance(doc, dict) and doc.get("provider", {}).get("type") == "fake_multinode":
        problems = local_autoscaling_problems(doc)
    elif isinstance(doc, dict) and "provider" in doc:
        problems = launcher_problems(doc, path)
    else:
        problems = ["neither a Ray cluster launcher config (provider:) nor a KubeRay manifest (apiVersion: ray.io/v1)"]
    assert problems == [], f"{path.name}:\n  " + "\n  ".join(problems)


# --- Ray cluster launcher ------------------------------------------------------------------------


def launcher_problems(config: dict[str, Any], path: Path | None = None) -> list[str]:
    """Ray's own validation of a launcher config, then octoray's expectations of it."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except (jsonschema.ValidationError, ValueError, KeyError, AssertionError) as exc:
        return [f"ray rejects it: {str(exc).splitlines()[0]}"]
    problems = []
    provider = config["provider"]["type"]
    types = config["available_node_types"]
    for name, node in types.items():
        unknown = set(node["node_config"]) - NODE_CONFIG_FIELDS.get(provider, set())
        if unknown:
            problems.append(f"{name}: node_config fields {sorted(unknown)} are not {provider} instance fields")
    head = types[config["head_node_type"]]
    if head.get("resources", {}).get("GPU"):
        problems.append("the head node should be a CPU node")
    gpu_types = [n for n, t in types.items() if t.get("resources", {}).get("GPU") == 8]
    if not gpu_types:
        problems.append("no worker node type with 8 GPUs")
    if not any(types[n].get("max_workers", 0) > types[n].get("min_workers", 0) for n in gpu_types):
        problems.append("no autoscaling GPU worker type (max_workers > min_workers)")
    if not any("octoray" in cmd and "pip install" in cmd for cmd in prepared["worker_setup_commands"]):
        problems.append("setup_commands do not install octoray")
    import ray

    images = [v for k, v in config.get("docker", {}).items() if k.endswith("image")]
    if any(f"ray:{ray.__version__}-" not in image for image in images):
        problems.append(f"docker images {images} do not pin the Ray octoray is tested with ({ray.__version__})")
    if path is not None:
        header = path.read_text(encoding="utf-8").split("\n\n", 1)[0]
        for command in (f"ray up cluster/{path.name}", "octoray submit"):
            if command not in header:
                problems.append(f"header comment lacks the command '{command}'")
    return problems


def local_autoscaling_problems(config: dict[str, Any]) -> list[str]:
    """Ray's schema check of the fake multi-node config (complete as written: Ray's wheel lacks
    the provider's defaults file, so nothing is merged in), and that it mirrors aws.yaml's node
    types: a head without CPUs, a CPU-only worker type, an accelerator worker type, all min 0."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    try:
        validate_config(copy.deepcopy(config))
    except (jsonschema.ValidationError, ValueError, KeyError, AssertionError) as exc:
        return [f"ray rejects it: {str(exc).splitlines()[0]}"]
    problems = []
    types = config["available_node_types"]
    if types[config["head_node_type"]].get("resources", {}).get("CPU") != 0:
        problems.append("the head must have CPU: 0 (no work on the head, as in aws.yaml)")
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    if not any(set(t["resources"]) == {"CPU"} for t in workers.values()):
        problems.append("no CPU-only worker type")
    if not any(set(t["resources"]) - {"CPU", "GPU"} for t in workers.values()):
        problems.append("no worker type advertising an accelerator custom resource")
    if any(t.get("min_workers", 0) for t in workers.values()):
        problems.append("worker types must start at min_workers 0")
    aws = _launcher("aws.yaml")
    if aws["available_node_types"][aws["head_node_type"]]["resources"].get("CPU") != 0:
        problems.append("aws.yaml's head runs work (CPU > 0) but the local mirror does not")
    return problems


def _launcher(name: str) -> dict[str, Any]:
    return _load(CLUSTER / name)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_check_rejects_broken_copies(name: str) -> None:
    good = _launcher(name)
    assert launcher_problems(good) == []
    typo = copy.deepcopy(good)
    typo["max_worker"] = 3  # not a field of ray-schema.json
    assert launcher_problems(typo)[0].startswith("ray rejects it")
    no_node_config = copy.deepcopy(good)
    del no_node_config["available_node_types"]["gpu_a100"]["node_config"]
    assert launcher_problems(no_node_config)[0].startswith("ray rejects it")
    bad_count = copy.deepcopy(good)
    bad_count["available_node_types"]["gpu_a100"]["max_workers"] = "four"
    assert launcher_problems(bad_count)[0].startswith("ray rejects it")
    field_typo = copy.deepcopy(good)
    node_config = field_typo["available_node_types"]["gpu_a100"]["node_config"]
    key = "InstanceType" if name == "aws.yaml" else "machineType"
    node_config[key + "s"] = node_config.pop(key)
    assert any("not" in p and "instance fields" in p for p in launcher_problems(field_typo))
    cpu_only = copy.deepcopy(good)
    for node in cpu_only["available_node_types"].values():
        node["resources"].pop("GPU", None)
    assert "no worker node type with 8 GPUs" in launcher_problems(cpu_only)


def test_launcher_instance_types_are_the_a100_ones() -> None:
    aws, gcp = _launcher("aws.yaml"), _launcher("gcp.yaml")
    assert aws["available_node_types"][aws["head_node_type"]]["node_config"]["InstanceType"] == "m5.2xlarge"
    assert aws["available_node_types"]["gpu_a100"]["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert aws["available_node_types"]["gpu_a100_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert gcp["available_node_types"]["gpu_a100"]["node_config"]["machineType"] == "a2-highgpu-8g"
    assert gcp["available_node_types"][gcp["head_node_type"]]["resources"].get("GPU", 0) == 0


# --- KubeRay -------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def crd_schema(shared_dir: Path, kind: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The storage version's openAPIV3Schema of ``kind``, as strict JSON Schema, and the paths
    that carry CEL rules (x-kubernetes-validations) jsonschema cannot evaluate."""
    crd = _load(shared_dir / "kuberay-crds" / KUBERAY_KINDS[kind])
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    cel: list[str] = []
    return _to_json_schema(version["schema"]["openAPIV3Schema"], "", cel), tuple(cel)


def _to_json_schema(node: Any, path: str, cel: list[str]) -> Any:
    """OpenAPI v3 structural schema -> JSON Schema with the API server's semantics."""
    if isinstance(node, list):
        return [_to_json_schema(item, path, cel) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _to_json_schema(sub, f"{path}.{name}", cel) for name, sub in value.items()}
        elif key == "items":
            out[key] = _to_json_schema(value, f"{path}[]", cel)
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = _to_json_schema(value, f"{path}.*", cel)
        elif not key.startswith("x-kubernetes-") and key not in ("nullable", "description"):
            out[key] = _to_json_schema(value, path, cel)
    if node.get("x-kubernetes-validations"):
        cel.append(path.lstrip("."))
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if node.get("format") in INT_RANGES and out.get("type") == "integer":
        out.setdefault("minimum", INT_RANGES[node["format"]][0])
        out.setdefault("maximum", INT_RANGES[node["format"]][1])
    # Strict field validation: an object with declared properties takes no others, unless the
    # schema preserves unknown fields (free-form parts such as embedded raw JSON).
    if "properties" in out and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def schema_problems(doc: dict[str, Any], shared_dir: Path) -> list[str]:
    """Every way ``doc`` breaks its CRD's schema (empty when it conforms)."""
    import jsonschema

    kind = doc.get("kind")
    if kind not in KUBERAY_KINDS:
        return [f"kind {kind!r} is not one of {sorted(KUBERAY_KINDS)}"]
    schema, cel_paths = crd_schema(shared_dir, kind)
    validator = jsonschema.Draft7Validator(schema)
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    for cel_path in cel_paths:  # fields with CEL rules: we cannot evaluate them, so do not use them
        if _lookup(doc, cel_path.split(".")) is not None:
            problems.append(f"{cel_path}: has CEL validation rules this test cannot check")
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: expected ray.io/v1, got {doc.get('apiVersion')!r}")
    name = (doc.get("metadata") or {}).get("name", "")
    if not DNS_1123.match(name) or len(name) > 63:
        problems.append(f"metadata.name: {name!r} is not a DNS-1123 label")
    return problems


def _lookup(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if part == "" or not isinstance(doc, dict):
            return doc if part == "" else None
        doc = doc.get(part)
    return doc


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside any of the three kinds."""
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[doc["kind"]] or {}


def cluster_spec_problems(spec: dict[str, Any]) -> list[str]:
    """Autoscaler v2, a CPU head, an autoscaling 8-GPU worker group, the tested Ray version."""
    import ray

    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    if (spec.get("autoscalerOptions") or {}).get("version") != "v2":
        problems.append("autoscalerOptions.version must be v2")
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} is not the tested Ray {ray.__version__}")
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    if "nvidia.com/gpu" in (head.get("resources") or {}).get("limits", {}):
        problems.append("the head should not take GPUs")
    gpu_groups = []
    for group in spec.get("workerGroupSpecs", []):
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            problems.append(f"{group['groupName']}: needs minReplicas <= replicas <= maxReplicas")
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        if str(limits.get("nvidia.com/gpu")) == "8":
            gpu_groups.append(group)
    if not gpu_groups:
        problems.append("no worker group with nvidia.com/gpu: 8")
    elif not any(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups):
        problems.append("the GPU worker group cannot autoscale (maxReplicas == minReplicas)")
    for container in _containers(spec):
        for port in container.get("ports", []):
            if len(port.get("name", "")) > 15:
                problems.append(f"port name {port['name']!r} is longer than 15 characters")
    return problems


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def rayjob_problems(doc: dict[str, Any]) -> list[str]:
    """The entrypoint is an octoray verb on a config file of this repository; the runtime env parses."""
    from octoray.cli import VERBS
    from octoray.cluster.jobs_client import CLIENT_VERBS

    problems = []
    words = shlex.split(doc["spec"].get("entrypoint", ""))
    if len(words) < 3 or words[0] != "octoray" or words[1] not in VERBS or words[1] in CLIENT_VERBS:
        problems.append(f"entrypoint {doc['spec'].get('entrypoint')!r} is not 'octoray <stage> CONFIG'")
    elif not (REPO_ROOT / words[2]).is_file():
        problems.append(f"entrypoint config {words[2]} is not a file of this repository")
    elif words[1] == "pipeline":  # its pipeline-level key=value overrides must be PipelineConfig keys
        from octoray.config import load_config
        from octoray.errors import UserError
        from octoray.pipeline.run import PipelineConfig

        try:
            load_config(PipelineConfig, REPO_ROOT / words[2], [w for w in words[3:] if "." not in w.split("=")[0]],
                        section="pipeline")
        except UserError as exc:
            problems.append(f"entrypoint: {exc}")
    problems += _runtime_env_problems(yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}"))
    return problems


def rayservice_problems(doc: dict[str, Any]) -> list[str]:
    """serveConfigV2 passes Ray Serve's own schema; each app's builder exists and accepts its args."""
    import importlib

    import pydantic
    from ray.serve.schema import ServeDeploySchema

    from octoray.config import from_mapping
    from octoray.errors import UserError
    from octoray.serving.app import ServeConfig

    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    except (pydantic.ValidationError, yaml.YAMLError) as exc:
        return [f"serveConfigV2: {str(exc).splitlines()[0]}"]
    problems = []
    for app in config.applications:
        module_name, _, attr = app.import_path.partition(":")
        try:
            builder = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            problems.append(f"{app.name}: import_path {app.import_path} does not exist")
            continue
        if not callable(builder):
            problems.append(f"{app.name}: {app.import_path} is not callable")
        if app.import_path == "octoray.serving.app:app_builder":
            try:
                from_mapping(ServeConfig, app.args or {}, source="serve args")
            except UserError as exc:
                problems.append(f"{app.name}: args: {exc}")
        problems += _runtime_env_problems(app.runtime_env or {})
    return problems


def _runtime_env_problems(env: dict[str, Any]) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as exc:
        return [f"runtime env: {exc}"]
    return []


def kuberay_problems(doc: dict[str, Any], shared_dir: Path) -> list[str]:
    """Schema first; the semantic checks only make sense on a manifest that has the right shape."""
    problems = schema_problems(doc, shared_dir)
    if problems:
        return problems
    problems = cluster_spec_problems(cluster_spec(doc))
    if doc["kind"] == "RayJob":
        problems += rayjob_problems(doc)
    if doc["kind"] == "RayService":
        problems += rayservice_problems(doc)
    return problems


def _manifest(name: str) -> dict[str, Any]:
    return _load(CLUSTER / "kuberay" / name)


def test_crd_schema_rejects_broken_copies(shared_dir: Path) -> None:
    good = _manifest("raycluster.yaml")
    assert schema_problems(good, shared_dir) == []

    def broken(edit) -> list[str]:
        doc = copy.deepcopy(good)
        edit(doc)
        return schema_problems(doc, shared_dir)

    assert any("enableInTreeAutoscale" in p for p in broken(lambda d: d["spec"].update(enableInTreeAutoscale=True)))
    assert any("v3" in p for p in broken(lambda d: d["spec"]["autoscalerOptions"].update(version="v3")))
    assert any("maxReplicas" in p for p in broken(lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="4")))
    assert any("groupName" in p for p in broken(lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName")))
    worker = ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits")
    assert any("nvidia.com/gpu" in p for p in broken(lambda d: _at(d, worker).update({"nvidia.com/gpu": "8 GPUs"})))
    assert any("cpu" in p for p in broken(lambda d: _at(d, worker).update(cpu=[90])))
    assert broken(lambda d: _at(d, worker).update(cpu=90)) == []  # int-or-string: both forms are fine
    assert any("2147483648" in p for p in broken(lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas=2**31)))
    assert any("DNS-1123" in p for p in broken(lambda d: d["metadata"].update(name="OctoRay")))
    assert any("managedBy" in p for p in broken(lambda d: d["spec"].update(managedBy="ray.io/kuberay-operator")))
    assert any("kind" in p for p in schema_problems({**good, "kind": "RayClusterz"}, shared_dir))


def test_semantic_checks_reject_broken_copies(shared_dir: Path) -> None:
    cluster = _manifest("raycluster.yaml")
    spec = copy.deepcopy(cluster["spec"])
    spec["autoscalerOptions"]["version"] = "v1"
    spec["workerGroupSpecs"][0]["minReplicas"] = 5  # above maxReplicas
    found = cluster_spec_problems(spec)
    assert "autoscalerOptions.version must be v2" in found
    assert any("minReplicas <= replicas <= maxReplicas" in p for p in found)

    job = _manifest("rayjob.yaml")
    assert rayjob_problems(job) == []
    bad_job = copy.deepcopy(job)
    bad_job["spec"]["entrypoint"] = "octoray pipeline jobs/nope.yaml"
    assert any("not a file" in p for p in rayjob_problems(bad_job))
    bad_job["spec"]["entrypoint"] = "octoray pipeline jobs/octocoder.yaml outt=/mnt/shared"
    assert any("outt" in p for p in rayjob_problems(bad_job))
    bad_job["spec"]["entrypoint"] = "octoray submit jobs/octocoder.yaml"
    assert any("is not 'octoray <stage> CONFIG'" in p for p in rayjob_problems(bad_job))

    service = _manifest("rayservice.yaml")
    assert rayservice_problems(service) == []
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    for edit, expected in (
        (lambda c: c["applications"][0].update(import_path="octoray.serving.app:no_such_builder"), "does not exist"),
        (lambda c: c["applications"][0]["args"].update(max_batch_sise=4), "max_batch_sise"),
        (lambda c: c["applications"][0].update(route_prefix=3), "serveConfigV2"),
    ):
        broken_config = copy.deepcopy(serve_config)
        edit(broken_config)
        broken = copy.deepcopy(service)
        broken["spec"]["serveConfigV2"] = yaml.safe_dump(broken_config)
        assert any(expected in p for p in rayservice_problems(broken)), expected


def test_kuberay_manifests_share_one_image_and_worker_shape() -> None:
    specs = {name: cluster_spec(_manifest(name)) for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml")}
    images = {c["image"] for spec in specs.values() for c in _containers(spec)}
    assert len(images) == 1, images
    shapes = {name: [(g["groupName"], g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                     for g in spec["workerGroupSpecs"]] for name, spec in specs.items()}
    assert shapes["raycluster.yaml"] == shapes["rayjob.yaml"] == shapes["rayservice.yaml"]
    assert _manifest("rayjob.yaml")["spec"]["entrypoint"].startswith("octoray pipeline jobs/octocoder.yaml")


def _at(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def test_shared_crds_are_found() -> None:
    # Not skipped silently in CI: the CRDs are the reference the manifests are checked against.
    assert (SHARED / "kuberay-crds" / "ray.io_rayclusters.yaml").is_file()


def test_outputs_default_to_a_bucket_with_node_identity() -> None:
    """Stage outputs on object storage by default (NFS is the documented alternative), and every
    node carries the cloud identity that grants the bucket (no keys in any file)."""
    job = _manifest("rayjob.yaml")
    out = [w for w in shlex.split(job["spec"]["entrypoint"]) if w.startswith("out=")]
    assert out and re.match(r"out=(s3|gs)://", out[0]), job["spec"]["entrypoint"]
    serve_args = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert re.match(r"(s3|gs)://", serve_args["model"])
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        spec = cluster_spec(_manifest(name))
        templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
        assert all(t["spec"].get("serviceAccountName") == "octoray" for t in templates), name
    for path, scheme, identity in ((CLUSTER / "aws.yaml", "s3", "IamInstanceProfile"),
                                   (CLUSTER / "gcp.yaml", "gs", "serviceAccounts")):
        text = path.read_text()
        assert re.search(rf"octoray submit \S+ out={scheme}://", text), path.name
        doc = _load(path)
        workers = [t for n, t in doc["available_node_types"].items() if n != doc["head_node_type"]]
        assert workers and all(identity in t["node_config"] for t in workers), path.name
    for path in sorted(CLUSTER.rglob("*.yaml")):
        assert not re.search(r"(?i)(aws_secret_access_key|secret_key)\s*[:=]", path.read_text()), path.name


def test_local_autoscaling_check_rejects_broken_copies() -> None:
    good = _load(CLUSTER / "local" / "autoscaling.yaml")
    assert local_autoscaling_problems(good) == []
    busy_head = copy.deepcopy(good)
    busy_head["available_node_types"][good["head_node_type"]]["resources"]["CPU"] = 2
    assert any("CPU: 0" in p for p in local_autoscaling_problems(busy_head))
    no_accelerator = copy.deepcopy(good)
    no_accelerator["available_node_types"]["gpu_worker"]["resources"].pop("fake_gpu")
    assert "no worker type advertising an accelerator custom resource" in local_autoscaling_problems(no_accelerator)


def test_spot_worker_groups_drain_before_the_grace_period_ends() -> None:
    """Every KubeRay manifest has a spot twin of its GPU group whose preStop hook drains the pod's
    Ray node (octoray's training workers then checkpoint) with a deadline inside the pod's grace
    period; the launcher files' spot node types are on the spot market."""
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        groups = {g["groupName"]: g for g in cluster_spec(_manifest(name))["workerGroupSpecs"]}
        spot = groups["gpu-a100x8-spot"]["template"]["spec"]
        regular = groups["gpu-a100x8"]["template"]["spec"]
        assert spot["containers"][0]["resources"] == regular["containers"][0]["resources"], name
        assert spot["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
        assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                "effect": "NoSchedule"} in spot["tolerations"]
        command = spot["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1]
        assert "ray drain-node" in command and "--reason=DRAIN_NODE_REASON_PREEMPTION" in command
        deadline = int(re.search(r"--deadline-remaining-seconds=(\d+)", command).group(1))
        sleep = int(re.search(r"sleep (\d+)", command).group(1))
        assert sleep < deadline < spot["terminationGracePeriodSeconds"], name
        assert "terminationGracePeriodSeconds" not in regular
    aws, gcp = _launcher("aws.yaml"), _launcher("gcp.yaml")
    market = aws["available_node_types"]["gpu_a100_spot"]["node_config"]["InstanceMarketOptions"]
    assert market == {"MarketType": "spot", "SpotOptions": {"InstanceInterruptionBehavior": "terminate"}}
    assert aws["available_node_types"]["gpu_a100_spot"]["node_config"]["MetadataOptions"]["HttpTokens"] == "required"
    assert gcp["available_node_types"]["gpu_a100_spot"]["node_config"]["scheduling"]["provisioningModel"] == "SPOT"
