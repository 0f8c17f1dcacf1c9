"""The deploy artifacts cannot drift from the schemas that will read them, or from each other.

- `cluster/deploy/kustomization.yaml` is rendered (a small kustomize for exactly the keys it uses; any
  other key fails here until the renderer learns it; where kustomize or kubectl is installed its output must
  be the same) and every object it makes is validated: the RayCluster
  against KubeRay v1.7's RayCluster schema (tests/cluster/data, its pod templates against Kubernetes'
  strict PodTemplateSpec), the others against Kubernetes' strict schemas (the kubernetes-validate
  package), each for the oldest and the newest Kubernetes in K8S_VERSIONS.
- KubeRay's own checks of a RayCluster (v1.7 `ValidateRayClusterSpec`) that the schema cannot express.
- The references between the objects and `serve.yaml` (loaded by the runtime's own config loader): names
  of the ConfigMap, Secrets and claim, ports, probes, replicas against placement.workers.
- `cluster/deploy/ray-cluster.yaml` against the launcher schema in Ray's wheel (ray/autoscaler/ray-schema.json).
No cluster is needed; what a cluster would add (scheduling, the operator's reconcile) is not checked here.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from moe_runtime.config import load_config

kubernetes_validate = pytest.importorskip("kubernetes_validate")
ray = pytest.importorskip("ray")

DEPLOY = Path(__file__).resolve().parents[2] / "cluster" / "deploy"
RAYCLUSTER_SCHEMA = Path(__file__).resolve().parent / "data" / "raycluster-v1.7-schema.yaml"
# The oldest Kubernetes the manifest is checked against (native gRPC probes are GA since 1.27) and the newest
# the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2]))
# Stand-ins for the token files an operator creates (secrets/ is git-ignored).
TOKENS = {"secrets/ray_auth_token": b"0" * 64, "secrets/grpc_token": b"1" * 64}
KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "secretGenerator", "generatorOptions",
                  "images"}


# -- rendering --------------------------------------------------------------------------------------------

def render(root: Path, files: dict[str, bytes]) -> list[dict[str, Any]]:
    """`kustomize build root` for the keys KUSTOMIZE_KEYS; `files`: contents of generator files by path."""
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZE_KEYS
    assert not unknown, f"kustomization.yaml uses {sorted(unknown)}: teach this renderer, then keep it"
    assert (k.get("generatorOptions") or {}).get("disableNameSuffixHash") is True, (
        "generated names must stay fixed: the RayCluster (a custom resource) refers to them by name")

    def read(path: str) -> bytes:
        return files[path] if path in files else (root / path).read_bytes()

    def entries(files_list: list[str]) -> dict[str, bytes]:
        out = {}
        for item in files_list:
            key, sep, path = item.partition("=")
            out[key if sep else Path(item).name] = read(path if sep else item)
        return out

    objects = [doc for res in k.get("resources", []) for doc in yaml.safe_load_all((root / res).read_text()) if doc]
    for gen in k.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files"}, gen
        data = {key: value.decode() for key, value in entries(gen["files"]).items()}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for gen in k.get("secretGenerator", []):
        assert set(gen) <= {"name", "files"}, gen
        data = {key: base64.b64encode(value).decode() for key, value in entries(gen["files"]).items()}
        objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]}, "type": "Opaque",
                        "data": data})
    for image in k.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    return objects


def _set_image(node: Any, image: dict[str, str]) -> None:
    """kustomize's `images`: every `image` under a `containers` or `initContainers` list, in any kind."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name = c.get("image", "").split("@")[0].rsplit(":", 1)[0]
                    if name == image["name"]:
                        c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
            _set_image(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_image(item, image)


def _real_kustomize() -> list[str] | None:
    """The command of a real kustomize on this machine, if any (kubectl embeds one)."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def test_renderer_matches_real_kustomize(tmp_path):
    """Where kustomize is installed, it renders exactly what the test's renderer does (with the same stand-in
    tokens), so the schema tests below check what `kubectl apply -k` would send."""
    command = _real_kustomize()
    if command is None:
        pytest.skip("neither kustomize nor kubectl on PATH")
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    for path, content in TOKENS.items():
        (tmp_path / "deploy" / path).write_bytes(content)
    out = subprocess.run([*command, str(tmp_path / "deploy")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    def normal(objects) -> list[dict[str, Any]]:
        """Sorted by kind and name; Secret data decoded (kustomize wraps its base64 in lines)."""
        for obj in objects:
            if obj["kind"] == "Secret":
                obj["data"] = {k: base64.b64decode("".join(v.split())) for k, v in obj["data"].items()}
        return sorted(objects, key=lambda o: (o["kind"], o["metadata"]["name"]))

    assert normal([doc for doc in yaml.safe_load_all(out.stdout) if doc]) == normal(render(DEPLOY, TOKENS))


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    """The rendered objects by "Kind/name"."""
    out = {}
    for obj in render(DEPLOY, TOKENS):
        key = f"{obj['kind']}/{obj['metadata']['name']}"
        assert key not in out, f"{key} twice"
        out[key] = obj
    return out


@pytest.fixture(scope="module")
def serve_cfg():
    return load_config(DEPLOY / "serve.yaml")


# -- schemas ----------------------------------------------------------------------------------------------

def _k8s_schema(version: str, name: str) -> dict[str, Any]:
    path = resources.files("kubernetes_validate") / f"kubernetes-json-schema/v{version}.0-local-strict/{name}"
    return json.loads(path.read_text())


def raycluster_validator(k8s_version: str) -> jsonschema.protocols.Validator:
    """KubeRay's RayCluster schema with `template` resolved to Kubernetes' strict PodTemplateSpec."""
    schema = yaml.safe_load(RAYCLUSTER_SCHEMA.read_text())
    registry = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc))
        for doc in (_k8s_schema(k8s_version, "_definitions.json"), _k8s_schema(k8s_version, "podtemplatespec-v1.json"))
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_raycluster_matches_kuberay_schema(objects, k8s_version):
    validator = raycluster_validator(k8s_version)
    errors = sorted(validator.iter_errors(objects["RayCluster/moe-runtime"]), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_raycluster_schema_rejects_drift(objects):
    """The schema bites: a misspelt field in a container, an unknown spec key, a non-string rayStartParam."""
    validator = raycluster_validator(K8S_VERSIONS[0])
    good = objects["RayCluster/moe-runtime"]
    for path, key, value in ((("spec", "headGroupSpec", "template", "spec", "containers", 1), "readinesProbe", {}),
                             (("spec",), "authOption", {"mode": "token"}),
                             (("spec", "headGroupSpec", "rayStartParams"), "num-gpus", 0)):
        bad = json.loads(json.dumps(good))
        node = bad
        for p in path:
            node = node[p]
        node[key] = value
        assert not validator.is_valid(bad), (path, key)


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_core_objects_match_kubernetes_schemas(objects, k8s_version):
    core = [obj for obj in objects.values() if obj["kind"] != "RayCluster"]
    assert {o["kind"] for o in core} >= {"ConfigMap", "Secret", "Service", "PersistentVolumeClaim"}
    example = yaml.safe_load((DEPLOY / "models-pv.example.yaml").read_text())
    for obj in (*core, example):
        kubernetes_validate.validate(obj, k8s_version, strict=True)


def test_kuberay_controller_checks(objects):
    """What KubeRay v1.7's ValidateRayClusterSpec refuses beyond the schema, for what the manifest uses."""
    spec = objects["RayCluster/moe-runtime"]["spec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"], "headGroupSpec needs a container"
    for group in spec["workerGroupSpecs"]:
        assert group["template"]["spec"]["containers"]
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    if spec.get("authOptions", {}).get("mode") == "token":
        major, minor, *_ = (int(x) for x in spec["rayVersion"].split("."))
        assert (major, minor) >= (2, 52), "token auth needs Ray >= 2.52"
    assert spec["rayVersion"] == ray.__version__, "the manifest's Ray is the one the lock pins"


# -- references between the artifacts ----------------------------------------------------------------------

def _head(objects) -> dict[str, Any]:
    return objects["RayCluster/moe-runtime"]["spec"]["headGroupSpec"]["template"]["spec"]


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == name)


def test_server_container_is_supervised_probed_and_logs_to_stdout(objects, serve_cfg):
    head = _head(objects)
    assert head["containers"][0]["name"] == "ray-head", "container 0 is Ray's: KubeRay probes it, gives it the token"
    server = _container(head, "moe-runtime")
    assert server["command"][:2] == ["moe-runtime", "serve"] and "lifecycle" not in server
    assert head.get("restartPolicy", "Always") == "Always"
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": serve_cfg.server.port, "moe-metrics": serve_cfg.telemetry.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == serve_cfg.server.port, probe
    assert head["terminationGracePeriodSeconds"] > serve_cfg.server.drain_grace_s
    config_mount = next(m for m in server["volumeMounts"] if m["name"] == "config")
    assert server["command"][-1] == f"{config_mount['mountPath']}/serve.yaml"


def test_references_resolve(objects, serve_cfg):
    cluster = objects["RayCluster/moe-runtime"]
    secret = objects[f"Secret/{cluster['spec']['authOptions']['secretName']}"]
    assert "auth_token" in secret["data"], "KubeRay reads the Ray token from key auth_token"
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"],
            *(g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"])]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for v in volumes.values():
            if "configMap" in v:
                assert f"ConfigMap/{v['configMap']['name']}" in objects
            if "persistentVolumeClaim" in v:
                claim = objects[f"PersistentVolumeClaim/{v['persistentVolumeClaim']['claimName']}"]
                assert claim["spec"]["accessModes"] == ["ReadOnlyMany"], "several pods mount the checkpoint"
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        for c in pod["containers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= set(volumes), c["name"]
            assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"]), f"{c['name']}: /dev/shm"
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in objects[f"Secret/{ref['name']}"]["data"], env["name"]
    server = _container(pods[0], "moe-runtime")
    assert {e["name"] for e in server["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MOE_RUNTIME_AUTH_TOKEN"}
    token = next(e for e in server["env"] if e["name"] == "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token["name"] == cluster["spec"]["authOptions"]["secretName"], "the driver joins with Ray's token"
    models = next(m for m in server["volumeMounts"] if m["name"] == "models")["mountPath"]
    assert serve_cfg.model.path.startswith(models + "/")
    assert serve_cfg.executor == "ray" and serve_cfg.ray.address is not None
    assert sum(g["replicas"] for g in cluster["spec"]["workerGroupSpecs"]) == serve_cfg.placement.workers
    config = objects["ConfigMap/moe-runtime-config"]["data"]["serve.yaml"]
    assert config == (DEPLOY / "serve.yaml").read_text()
    service = objects["Service/moe-runtime"]["spec"]
    assert service["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    assert {p["targetPort"] for p in service["ports"]} <= {p["name"] for p in server["ports"]}


# The ports KubeRay v1.7 gives the Ray container (container 0) of the head pod when the manifest does not
# (controllers/ray/utils/constant.go: client, gcs-server, dashboard, metrics, serve): its metrics port is added
# even when the manifest lists other ports.
KUBERAY_HEAD_PORT_NAMES = {"client", "gcs-server", "dashboard", "metrics", "serve"}


def test_port_names_are_unique_in_the_head_pod(objects):
    """A Service's targetPort names a port; Kubernetes resolves it to the first container of the pod that has
    a port of that name. Were the server's metrics port called "metrics", the Service would reach the Ray
    container's metrics port that KubeRay adds (8080), not the server's /metrics."""
    head = _head(objects)
    ray_names = {p["name"] for p in head["containers"][0].get("ports", [])} | KUBERAY_HEAD_PORT_NAMES
    others = [p["name"] for c in head["containers"][1:] for p in c.get("ports", [])]
    assert len(others) == len(set(others)) and not ray_names & set(others), (ray_names, others)
    server = _container(head, "moe-runtime")
    for port in objects["Service/moe-runtime"]["spec"]["ports"]:
        assert port["targetPort"] in {p["name"] for p in server["ports"]}, port


def test_images_point_at_one_built_image(objects):
    images = {c["image"] for obj in objects.values() if obj["kind"] == "RayCluster"
              for pod in [obj["spec"]["headGroupSpec"]["template"], *[g["template"] for g in obj["spec"]["workerGroupSpecs"]]]
              for c in pod["spec"]["containers"]}
    assert len(images) == 1 and "example" not in images.pop()


# -- the Ray cluster launcher -----------------------------------------------------------------------------

def test_launcher_yaml_matches_ray_schema():
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    mounts = config["file_mounts"]
    assert mounts["~/serve.yaml"] == "cluster/deploy/serve.yaml" and (DEPLOY / "serve.yaml").exists()
    assert mounts["~/.ray/auth_token"].startswith("cluster/deploy/secrets/")
    assert all("example.invalid" not in cmd for cmd in config["setup_commands"]), "a real install source"
    assert any("[cluster]" in cmd for cmd in config["setup_commands"]), "ray[default] on every node"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [cmd for cmd in config[key] if "ray start" in cmd]
        assert start and all("RAY_AUTH_MODE=token" in cmd for cmd in start), f"{key}: token auth, fail closed"


def test_launcher_schema_rejects_drift():
    """Ray's launcher schema bites where a typo would otherwise be ignored or fail only at `ray up`: a
    misspelt top-level key, a misspelt auth key, a list where file_mounts is a mapping."""
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    good = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    assert validator.is_valid(good)
    for path, key, value in (((), "setup_command", []), (("auth",), "ssh_usr", "ubuntu"), ((), "file_mounts", [])):
        bad = json.loads(json.dumps(good))
        node = bad
        for p in path:
            node = node[p]
        node[key] = value
        assert not validator.is_valid(bad), (path, key)

# -- the token files ---------------------------------------------------------------------------------------

def test_token_files_are_never_committed():
    """Every file the kustomization turns into a Secret, and the launcher copies as a token, lies in
    secrets/, which git ignores but for its own .gitignore (the folder must exist in a checkout)."""
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    secret_files = [item.partition("=")[2] or item for gen in k["secretGenerator"] for item in gen["files"]]
    launcher = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())["file_mounts"]
    token_mounts = [local for remote, local in launcher.items() if "token" in remote]
    assert set(secret_files) == set(TOKENS) and {str(Path(p).relative_to("cluster/deploy")) for p in token_mounts} \
        == set(TOKENS)
    ignore = (DEPLOY / "secrets" / ".gitignore").read_text().split("\n")
    assert "*" in ignore and "!.gitignore" in ignore
    git = shutil.which("git")
    if git is None or not (DEPLOY.parents[1] / ".git").exists():
        pytest.skip("no git checkout: the .gitignore's two rules were checked above")
    paths = [str(DEPLOY / p) for p in (*TOKENS, "secrets/.gitignore")]
    ignored = subprocess.run([git, "check-ignore", "--no-index", *paths], capture_output=True, text=True,
                             cwd=DEPLOY).stdout.split()
    assert ignored == paths[:-1], ignored
