"""infra/: the KubeRay manifests, the MLflow server, the cluster-launcher config, the Dockerfile and the
README, checked as far as they can be without a cluster, Docker or network.

* every YAML file parses; the KubeRay resources carry the fields KubeRay requires and no field it does
  not know (field names from ray-operator/apis/ray/v1/*_types.go), and their pods are consistent
  (images, volumes, GPUs, the Ray version, the data path);
* every command line in them that runs latentforge, DVC or `ray job submit` parses with that tool's own
  parser, names a real model family and sets only params that exist;
* the cluster-launcher config passes Ray's own schema and the checks `ray up` makes before it contacts
  the cloud;
* the Dockerfile installs the pinned torch before the project, on the Ray and Python the project uses.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import io
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
README = INFRA / "README.md"
CLUSTER_YAML = INFRA / "cluster.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
EXPORT_DIR = INFRA / "cluster-src"  # `git archive` export for cluster.yaml; git-ignored, never checked

# ----------------------------------------------------------------------------------------------------
# Field names of the KubeRay ray.io/v1 API (ray-operator/apis/ray/v1/{rayjob,raycluster}_types.go):
# kubectl apply prunes a misspelt field silently, so a typo here would be a setting that never applies.

RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}
RAYCLUSTER_SPEC_FIELDS = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}
AUTOSCALER_OPTIONS_FIELDS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
    "env", "envFrom", "volumeMounts", "version",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
# Kubernetes core/v1 PodSpec and Container fields (the subset worth allowing in these manifests).
POD_SPEC_FIELDS = {
    "containers", "initContainers", "volumes", "tolerations", "nodeSelector", "affinity",
    "securityContext", "restartPolicy", "serviceAccountName", "imagePullSecrets",
    "terminationGracePeriodSeconds", "priorityClassName", "schedulerName", "hostIPC", "hostNetwork",
    "topologySpreadConstraints", "runtimeClassName", "enableServiceLinks",
}
CONTAINER_FIELDS = {
    "name", "image", "imagePullPolicy", "command", "args", "workingDir", "ports", "env", "envFrom",
    "resources", "volumeMounts", "lifecycle", "livenessProbe", "readinessProbe", "startupProbe",
    "securityContext", "terminationMessagePath", "terminationMessagePolicy", "stdin", "tty",
}


@functools.cache
def _parsed(path: Path) -> tuple:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 10x faster
    return tuple(doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc is not None)


def load_docs(path: Path) -> list[dict]:
    """The YAML documents of ``path`` (anchors and aliases resolved, as kubectl does); a fresh copy."""
    return copy.deepcopy(list(_parsed(path)))


def one(path: Path, kind: str) -> dict:
    docs = [d for d in load_docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*.y*ml") if EXPORT_DIR not in p.parents)


def installed_ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def torch_pin() -> str:
    """The torch version of requirements.lock (``torch==X+cpu --hash=...``, the local build tag dropped):
    the project's single pin, which the GPU installs name with their CUDA wheel index."""
    m = re.search(r"^torch==([^\s+]+)", (REPO / "requirements.lock").read_text(), re.M)
    assert m, "requirements.lock: no `torch==<version>` line"
    return m.group(1)


def quantity(value) -> float:
    """A Kubernetes quantity for CPUs or GPUs: 8, "8", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# ----------------------------------------------------------------------------------------------------
# Every YAML file


def test_the_expected_files_exist():
    for rel in ("README.md", "cluster.yaml", "docker/Dockerfile", "k8s/rayjob-train.yaml",
                "k8s/raycluster.yaml", "k8s/mlflow.yaml", "k8s/rayservice.yaml"):
        assert (INFRA / rel).is_file(), f"infra/{rel} is missing"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path):
    docs = load_docs(path)
    assert docs, f"{path}: no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}, not a mapping"
        if path.parent == K8S:
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{path.name}: a document has no {key}"
            assert doc["metadata"].get("name"), f"{path.name}: a {doc['kind']} has no metadata.name"


# ----------------------------------------------------------------------------------------------------
# KubeRay


def check_pod_template(template: dict, where: str) -> list[str]:
    """Problems of a pod template: unknown fields, containers without image or name, mounts of volumes
    the pod does not have."""
    problems = []
    spec = template.get("spec") or {}
    problems += [f"{where}.spec: unknown field {k!r}" for k in sorted(set(spec) - POD_SPEC_FIELDS)]
    containers = spec.get("containers") or []
    if not containers:
        problems.append(f"{where}.spec.containers: empty")
    volumes = {v["name"] for v in spec.get("volumes") or []}
    for group in ("initContainers", "containers"):
        for c in spec.get(group) or []:
            cw = f"{where}.spec.{group}[{c.get('name')}]"
            problems += [f"{cw}: unknown field {k!r}" for k in sorted(set(c) - CONTAINER_FIELDS)]
            if not c.get("name"):
                problems.append(f"{cw}: no name")
            if not c.get("image"):
                problems.append(f"{cw}: no image")
            for mount in c.get("volumeMounts") or []:
                if mount["name"] not in volumes:
                    problems.append(f"{cw}: mounts volume {mount['name']!r}, which the pod does not define")
    return problems


def check_ray_cluster_spec(spec: dict, where: str) -> list[str]:
    problems = [f"{where}: unknown field {k!r}" for k in sorted(set(spec) - RAYCLUSTER_SPEC_FIELDS)]
    if spec.get("rayVersion") != installed_ray_version():
        problems.append(f"{where}.rayVersion {spec.get('rayVersion')!r} is not the installed Ray {installed_ray_version()}")
    problems += [f"{where}.autoscalerOptions: unknown field {k!r}"
                 for k in sorted(set(spec.get("autoscalerOptions") or {}) - AUTOSCALER_OPTIONS_FIELDS)]
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + [f"{where}: no headGroupSpec"]
    problems += [f"{where}.headGroupSpec: unknown field {k!r}" for k in sorted(set(head) - HEAD_GROUP_FIELDS)]
    groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{g.get('groupName')}]", g) for g in spec.get("workerGroupSpecs") or []]
    if len(groups) < 2:
        problems.append(f"{where}: no workerGroupSpecs")
    for name, group in groups:
        gw = f"{where}.{name}"
        if name != "headGroupSpec":
            problems += [f"{gw}: unknown field {k!r}" for k in sorted(set(group) - WORKER_GROUP_FIELDS)]
            lo, n, hi = group.get("minReplicas"), group.get("replicas", group.get("minReplicas")), group.get("maxReplicas")
            if not all(isinstance(v, int) for v in (lo, n, hi)) or not lo <= n <= hi:
                problems.append(f"{gw}: needs integers minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
        params = group.get("rayStartParams")
        if not isinstance(params, dict):
            problems.append(f"{gw}.rayStartParams: required (a mapping, may be empty)")
        else:  # map[string]string in the CRD: an unquoted number is rejected by the API server
            problems += [f"{gw}.rayStartParams.{k}: {v!r} must be a string" for k, v in params.items() if not isinstance(v, str)]
        problems += check_pod_template(group.get("template") or {}, f"{gw}.template")
    return problems


def ray_containers(cluster_spec: dict) -> list[dict]:
    """The Ray container (the first) of the head and of every worker group."""
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"]["containers"][0] for g in groups]


def gpus(container: dict) -> tuple[float, float | None]:
    res = container.get("resources") or {}
    limit = (res.get("limits") or {}).get("nvidia.com/gpu", 0)
    request = (res.get("requests") or {}).get("nvidia.com/gpu")
    return quantity(limit), None if request is None else quantity(request)


def test_rayjob_has_the_fields_kuberay_needs():
    job = one(K8S / "rayjob-train.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    problems = [f"spec: unknown field {k!r}" for k in sorted(set(spec) - RAYJOB_SPEC_FIELDS)]
    assert problems == []
    assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip()
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    env_vars = runtime_env["env_vars"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()), "runtime_env env_vars must be strings"
    assert env_vars.get("MLFLOW_TRACKING_URI", "").startswith("http"), "the job must log to an MLflow server"
    assert spec.get("shutdownAfterJobFinishes") is True
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
        submitter = spec["submitterPodTemplate"]
        assert check_pod_template(submitter, "spec.submitterPodTemplate") == []
        assert submitter["spec"].get("restartPolicy") in ("Never", "OnFailure")
    assert check_ray_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec") == []
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        limit, request = gpus(group["template"]["spec"]["containers"][0])
        assert limit >= 1, f"worker group {group['groupName']}: no nvidia.com/gpu limit"
        assert request in (None, limit), f"worker group {group['groupName']}: GPU requests must equal limits"


def test_raycluster_has_the_fields_kuberay_needs_and_autoscales():
    cluster = one(K8S / "raycluster.yaml", "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert check_ray_cluster_spec(spec, "spec") == []
    assert spec.get("enableInTreeAutoscaling") is True
    groups = spec["workerGroupSpecs"]
    assert any(g["maxReplicas"] > g["minReplicas"] for g in groups), "autoscaling needs room: maxReplicas > minReplicas"
    gpu_groups = [g for g in groups if gpus(g["template"]["spec"]["containers"][0])[0] >= 1]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    for g in gpu_groups:
        limit, request = gpus(g["template"]["spec"]["containers"][0])
        assert request in (None, limit), f"worker group {g['groupName']}: GPU requests must equal limits"
    for c in ray_containers(spec):  # the autoscaler sizes nodes from these
        assert quantity(c["resources"]["limits"]["cpu"]) > 0 and c["resources"]["limits"]["memory"]


def test_one_image_for_every_pod_and_the_readme_builds_it():
    """Head, workers, init containers, submitter and MLflow server run the same image (same Ray, same
    code), and it is the image the README's `docker build` line tags."""
    images = set()

    def collect(node):
        if isinstance(node, dict):
            if isinstance(node.get("image"), str) and "containers" not in node:
                images.add(node["image"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    for path in (K8S / "rayjob-train.yaml", K8S / "raycluster.yaml", K8S / "mlflow.yaml", K8S / "rayservice.yaml"):
        for doc in load_docs(path):
            collect(doc)
    assert len(images) == 1, f"the pods use several images: {sorted(images)}"
    image = images.pop()
    builds = [cmd for kind, text in readme_texts() if kind == "block"
              for _, cmd in shell_commands(text, "docker") if cmd[:1] == ["build"] and "-f" in cmd]
    assert builds, "infra/README.md: no `docker build -f ...` line"
    for cmd in builds:
        assert (REPO / cmd[cmd.index("-f") + 1]).is_file()
        assert cmd[cmd.index("-t") + 1] == image, f"the README builds {cmd[cmd.index('-t') + 1]}, the manifests use {image}"


def test_rayservice_serves_serving_config_yaml_on_the_cluster():
    """The RayService's serveConfigV2 is Serve's own schema and is serving/config.yaml but for the
    store (the MLflow Service the other pods use) and the HTTP host (0.0.0.0, reachable in the pod)."""
    from ray.serve.schema import ServeDeploySchema

    service = one(K8S / "rayservice.yaml", "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    assert set(service["spec"]) <= {"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serveService",
                                    "excludeHeadPodFromServeSvc", "deploymentUnhealthySecondThreshold",
                                    "serviceUnhealthySecondThreshold", "managedBy", "rayClusterDeletionDelaySeconds"}
    assert check_ray_cluster_spec(service["spec"]["rayClusterConfig"], "spec.rayClusterConfig") == []
    deployed = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(deployed)
    local = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    assert deployed["http_options"]["host"] == "0.0.0.0"
    (app,), (local_app,) = deployed["applications"], local["applications"]
    assert app["args"].pop("tracking_uri") == "http://mlflow:5000"
    local_app["args"].pop("tracking_uri")
    assert app == local_app, "serveConfigV2 and serving/config.yaml differ"
    from latentforge.serving.schemas import AppConfig

    AppConfig.model_validate({**app["args"], "tracking_uri": "http://mlflow:5000"})


def test_rayjob_fits_its_cluster_and_uses_its_gpus():
    from latentforge.pipelines.cli import build_parser
    from latentforge.pipelines.common.params import apply_overrides, load_params

    spec = one(K8S / "rayjob-train.yaml", "RayJob")["spec"]
    args = build_parser().parse_args(shell_split(spec["entrypoint"])[3:])
    params = apply_overrides(load_params(REPO / "params.yaml"), [s for s in args.set or [] if s.startswith("train.")])
    workers = args.num_workers or params["train"]["num_workers"]
    cpus_per_worker = params["train"]["cpus_per_worker"]
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    total_gpus = sum(g["replicas"] * gpus(g["template"]["spec"]["containers"][0])[0] for g in groups)
    total_cpus = sum(g["replicas"] * quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) for g in groups)
    head_cpus = spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].get("num-cpus")
    if head_cpus is None:
        head_cpus = quantity(ray_containers(spec["rayClusterSpec"])[0]["resources"]["limits"]["cpu"])
    assert args.use_gpu, "the workers have GPUs but the entrypoint does not pass --use-gpu"
    assert total_gpus >= workers, f"{workers} workers need {workers} GPUs; the worker groups have {total_gpus:g}"
    assert total_cpus + float(head_cpus) >= workers * cpus_per_worker


def test_rayjob_entrypoint_is_one_plain_command():
    """KubeRay pastes the entrypoint into the submitter's `bash -c` line (`ray job submit ... -- <it>`):
    an operator or expansion in it would run in the submitter pod, not in the job."""
    spec = one(K8S / "rayjob-train.yaml", "RayJob")["spec"]
    entrypoint = spec["entrypoint"]
    assert not re.search(r"[;&|<>$`()\\\n]", entrypoint.strip()), entrypoint
    # the runtime env goes into the same line as one double-quoted JSON string: no expansions in it
    assert not re.search(r"[$`]", json.dumps(yaml.safe_load(spec["runtimeEnvYAML"])))
    assert shell_split(entrypoint)[:3] == ["python", "-m", "latentforge.pipelines.cli"]


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "raycluster.yaml"])
def test_every_ray_pod_finds_the_prepared_data_where_the_job_reads_it(name):
    """The init container pulls ``<workingDir>/<params data.output_dir>`` into a volume; the Ray
    container must mount that volume at the path the job reads (``--set data.output_dir``)."""
    from latentforge.pipelines.cli import build_parser
    from latentforge.pipelines.common.params import load_params

    docs = load_docs(K8S / name)
    spec = docs[0]["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    data_dir = load_params(REPO / "params.yaml")["data"]["output_dir"]
    if "entrypoint" in spec:
        args = build_parser().parse_args(shell_split(spec["entrypoint"])[3:])
        data_dir = next(s.partition("=")[2] for s in args.set if s.startswith("data.output_dir="))
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        inits = [c for c in pod.get("initContainers") or [] if "dvc pull" in " ".join(c.get("command") or [])]
        assert len(inits) == 1, "every Ray pod needs the dvc-pull init container"
        init, ray = inits[0], pod["containers"][0]
        pulled = str(Path(init["workingDir"]) / load_params(REPO / "params.yaml")["data"]["output_dir"])
        init_volume = next((m["name"] for m in init["volumeMounts"] if m["mountPath"] == pulled), None)
        assert init_volume, f"{name}: the init container pulls into {pulled}, which is no volume of the pod"
        mounts = {m["name"]: m["mountPath"] for m in ray["volumeMounts"]}
        assert mounts.get(init_volume) == str(Path(data_dir) if Path(data_dir).is_absolute() else Path(init["workingDir"]) / data_dir)


# ----------------------------------------------------------------------------------------------------
# MLflow server


def test_mlflow_server_is_reachable_where_the_ray_pods_look_for_it():
    path = K8S / "mlflow.yaml"
    pvc, deploy, service = one(path, "PersistentVolumeClaim"), one(path, "Deployment"), one(path, "Service")
    assert pvc["apiVersion"] == "v1" and deploy["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert check_pod_template(pod, "Deployment.template") == []
    # sqlite and a ReadWriteOnce volume: never two pods at once
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    assert "ReadWriteOnce" in pvc["spec"]["accessModes"]

    container = pod["spec"]["containers"][0]
    argv = container["command"] + container.get("args", [])
    assert argv[:2] == ["latentforge", "mlflow-server"]
    from latentforge.pipelines.cli import build_parser

    args = build_parser().parse_args(argv[1:])
    assert args.host == "0.0.0.0"
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert args.port in ports.values()
    svc_port = service["spec"]["ports"][0]
    target = svc_port["targetPort"]
    assert (ports.get(target) if isinstance(target, str) else target) == args.port
    # the database and the artifacts live on the claim
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    on_claim = [m["mountPath"] for m in container["volumeMounts"]
                if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]]
    assert args.backend_store_uri.startswith("sqlite:////")
    for stored in (args.backend_store_uri[len("sqlite:///"):], args.artifacts):
        assert any(Path(m) in Path(stored).parents for m in on_claim), f"{stored} is not on the volume {pvc['metadata']['name']}"

    # the tracking URI of the Ray pods names this Service, and MLflow's Host check lets it in
    allowed = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS").split(",")
    uris = [yaml.safe_load(one(K8S / "rayjob-train.yaml", "RayJob")["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]]
    uris += [e["value"] for c in ray_containers(one(K8S / "raycluster.yaml", "RayCluster")["spec"])
             for e in c.get("env") or [] if e["name"] == "MLFLOW_TRACKING_URI"]
    assert len(uris) >= 2
    for uri in uris:
        url = urlsplit(uri)
        assert url.scheme == "http" and url.hostname.split(".")[0] == service["metadata"]["name"], uri
        assert url.port == svc_port["port"], uri
        assert mlflow_allows_host(allowed, url.netloc), f"MLflow would answer 403 to Host: {url.netloc}"
    assert mlflow_allows_host(allowed, f"localhost:{svc_port['port']}"), "`kubectl port-forward` sends Host: localhost:<port>"


def mlflow_allows_host(allowed: list[str], host: str) -> bool:
    """mlflow.server.security_utils.is_allowed_host_header: exact names, fnmatch patterns when they
    hold a ``*``. (Importing mlflow costs seconds; its rule is these three lines.)"""
    allowed = [a.strip() for a in allowed]
    return "*" in allowed or any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


# ----------------------------------------------------------------------------------------------------
# Command lines: latentforge, dvc, ray job submit, found in every file here


SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;", ">", "<", ">>"}


def shell_split(text: str) -> list[str]:
    """Split like a POSIX shell would into words and operator tokens (``&&``, ``;``, ``|`` ...)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def shell_commands(text: str, program: str) -> list[tuple[str, list[str]]]:
    """(the line, the arguments after ``program``) for every simple command in ``text`` that runs
    ``program`` (a word, or words such as ``python -m latentforge.pipelines.cli``): where a command starts (a line's
    start, after an operator, after a wrapper's ``--``), past ``NAME=value`` assignments. The arguments
    end at the next shell operator."""
    words = program.split()
    mention = re.compile(r"(?<![\w./$-])" + r"\s+".join(map(re.escape, words)) + r"(?=\s|$)")
    found = []
    for line in logical_lines(text):
        if not mention.search(line):
            continue
        try:
            tokens = shell_split(line)
        except ValueError as exc:
            pytest.fail(f"{line.strip()!r}: not a shell command line: {exc}")
        starts = [0] + [i + 1 for i, t in enumerate(tokens) if t in SHELL_OPERATORS or t == "--"]
        for s in starts:
            while s < len(tokens) and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[s]):
                s += 1
            if tokens[s : s + len(words)] == words:
                rest = tokens[s + len(words) :]
                end = next((i for i, w in enumerate(rest) if w in SHELL_OPERATORS), len(rest))
                found.append((line.strip(), rest[:end]))
    return found


def readme_texts() -> list[tuple[str, str]]:
    """("block" | "inline", text) for the README's fenced code blocks and its inline code spans."""
    text = README.read_text()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return [("block", b) for b in blocks] + [("inline", s) for s in re.findall(r"`([^`\n]+)`", prose)]


def yaml_texts(node) -> list[tuple[str, object]]:
    """The strings of a YAML tree, and its lists of strings (a container's argv) as lists."""
    out: list[tuple[str, object]] = []
    if isinstance(node, dict):
        for value in node.values():
            out += yaml_texts(value)
    elif isinstance(node, list):
        if node and all(isinstance(v, str) for v in node):
            out.append(("argv", node))
        for value in node:
            out += yaml_texts(value)
    elif isinstance(node, str):
        out.append(("text", node))
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [l for l in DOCKERFILE.read_text().splitlines() if not l.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l.strip() else "")
            for l in joined.splitlines() if l.strip()]


@functools.cache
def all_commands(program: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(source, line, arguments) for ``program`` in the README (code blocks and inline spans), every
    YAML file here and the Dockerfile's RUN lines. Sources ending in ":inline" are inline code spans,
    which name a command rather than spell out a run."""
    found = []
    for kind, text in readme_texts():
        found += [(f"README.md:{kind}", line, args) for line, args in shell_commands(text, program)]
    for path in yaml_files():
        where = str(path.relative_to(INFRA))
        for doc in load_docs(path):
            for kind, value in yaml_texts(doc):
                if kind == "argv":
                    words = program.split()
                    if value[: len(words)] == words:
                        found.append((where, shlex.join(value), value[len(words):]))
                else:
                    found += [(where, line, args) for line, args in shell_commands(value, program)]
    for instruction, rest in dockerfile_instructions():
        if instruction == "RUN":
            found += [("docker/Dockerfile", line, args) for line, args in shell_commands(rest, program)]
    return tuple((where, line, tuple(args)) for where, line, args in found)


def latentforge_commands() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    return all_commands("latentforge") + all_commands("python -m latentforge.pipelines.cli") + all_commands("python3 -m latentforge.pipelines.cli")


def parse_or_fail(parser, argv: list[str], where: str):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(list(argv))
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse: {err.getvalue().strip().splitlines()[-1:]}")


def check_overrides(overrides: list[str], family: str | None, where: str) -> None:
    """``--set`` must name params that exist, with values of the right type, as `latentforge` checks."""
    import dataclasses

    from latentforge.models import MODELS
    from latentforge.pipelines.common.params import ParamsError, apply_overrides, check_keys, load_params, section
    from latentforge.pipelines.prepare import DATA_SCHEMA
    from latentforge.pipelines.train import TRAIN_SCHEMA

    params = load_params(REPO / "params.yaml")
    dotted = [o for o in overrides if "." in o.partition("=")[0]]
    try:
        params = apply_overrides(params, dotted)
        check_keys(section(params, "train"), TRAIN_SCHEMA, "train")
        check_keys({k: v for k, v in section(params, "data").items() if k in DATA_SCHEMA}, DATA_SCHEMA, "data")
    except ParamsError as exc:
        pytest.fail(f"{where}: {exc}")
    bare = [o.partition("=")[0] for o in overrides if o not in dotted]
    if bare:
        assert family is not None, f"{where}: --set {bare} needs a model family"
        known = {f.name for f in dataclasses.fields(MODELS[family].config_class)} | set(TRAIN_SCHEMA) - {"models", "families"}
        assert set(bare) <= known, f"{where}: --set {sorted(set(bare) - known)}: not a field of {family} nor a train setting"


def image_workdir() -> str:
    return [rest for instruction, rest in dockerfile_instructions() if instruction == "WORKDIR"][-1].strip()


def test_every_latentforge_command_line_parses_and_names_a_model_family():
    from latentforge.models import MODELS
    from latentforge.pipelines.cli import build_parser

    commands = latentforge_commands()
    count: dict[str, int] = {}
    for where, line, argv in commands:
        source = where.split(":")[0]
        count[source] = count.get(source, 0) + 1
        here = f"{where}: {line}"
        if not argv:
            continue  # the bare name (in prose, or a YAML value such as a cluster name), not a run
        args = parse_or_fail(build_parser(), argv, here)
        if args.command == "submit":
            train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
            if where.endswith(":inline") and not train_args:
                continue  # a mention of the command, not a run
            train = parse_or_fail(build_parser(), ["train", *train_args], here)
            args.model, args.set = train.model, (train.set or []) + (args.set or [])
        if args.command in ("train", "submit"):
            assert args.model in MODELS, f"{here}: unknown model family {args.model!r}; known: {sorted(MODELS)}"
        if args.command in ("train", "submit", "prepare"):
            check_overrides(args.set or [], getattr(args, "model", None), here)
            params = Path(args.params)
            if params.is_absolute():  # a path inside the image
                assert params.parent == Path(image_workdir()), f"{here}: {params} is not in the image's {image_workdir()}"
            else:
                assert (REPO / params).is_file(), f"{here}: {params} does not exist"
    # the files that must hold runnable commands do
    assert count.get("README.md", 0) >= 6, count
    assert count.get("k8s/rayjob-train.yaml", 0) >= 1, count
    assert count.get("k8s/mlflow.yaml", 0) >= 1, count


def test_every_dvc_command_line_parses_and_names_real_stages():
    from dvc.cli import DvcParserError
    from dvc.cli.parser import get_main_parser

    stages = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    remotes = set(re.findall(r"""^\[\s*'?remote "([^"]+)"'?\s*\]""", (REPO / ".dvc" / "config").read_text(), re.M))
    assert remotes, ".dvc/config names no remote"
    commands = all_commands("dvc")
    assert len([c for c in commands if c[0].startswith("README")]) >= 3
    assert any(c[0] == "cluster.yaml" for c in commands) and any(c[0].startswith("k8s/") for c in commands)
    for where, line, argv in commands:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                args = get_main_parser().parse_args(list(argv))
        except (SystemExit, DvcParserError):
            pytest.fail(f"{where}: `dvc {shlex.join(argv)}` does not parse: {err.getvalue().strip().splitlines()[-1:]}")
        if args.cmd in ("pull", "push", "repro", "fetch"):
            for target in args.targets or []:
                assert target in stages or (REPO / target).exists(), f"{where}: {line}: no stage or path {target!r}"
        if args.cmd == "modify" or getattr(args, "remote", None):
            name = args.name if args.cmd == "modify" else args.remote
            assert name in remotes, f"{where}: {line}: no remote {name!r} in .dvc/config ({sorted(remotes)})"


def test_every_ray_job_submit_line_parses_with_rays_cli():
    import click
    from ray.dashboard.modules.job.cli import submit

    commands = [c for c in all_commands("ray job submit") if not c[0].endswith(":inline")]  # inline: mentions
    assert commands, "infra/README.md shows no `ray job submit`"
    for where, line, argv in commands:
        try:
            ctx = submit.make_context("submit", list(argv))
        except click.ClickException as exc:
            pytest.fail(f"{where}: {line}: {exc.format_message()}")
        assert ctx.params["entrypoint"][:3] == ("python", "-m", "latentforge.pipelines.cli")
        if ctx.params.get("runtime_env_json"):
            assert isinstance(json.loads(ctx.params["runtime_env_json"]), dict)


def test_paths_named_by_ray_kubectl_and_docker_commands_exist():
    checked = 0
    for verb in ("up", "down", "dashboard", "attach", "exec"):
        for where, line, argv in all_commands(f"ray {verb}"):
            positional = [a for a in argv if not a.startswith("-")]
            if where.endswith(":inline") and not positional:
                continue  # `ray up` named in prose
            config = positional[0]
            assert (REPO / config).is_file(), f"{where}: {line}: no {config}"
            checked += 1
    for where, line, argv in all_commands("kubectl apply"):
        for i, arg in enumerate(argv):
            if arg == "-f":
                assert (REPO / argv[i + 1]).is_file(), f"{where}: {line}: no {argv[i + 1]}"
                checked += 1
    assert checked >= 5


# ----------------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    jsonschema.validate(config, schema)


def test_cluster_yaml_passes_the_checks_ray_up_makes_before_the_cloud():
    """`ray up` fills in the provider's defaults, then validates (ray.autoscaler._private.commands)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(yaml.safe_load(CLUSTER_YAML.read_text())))
    validate_config(config)
    head = config["head_node_type"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != head}
    assert workers and all(v["max_workers"] >= v.get("min_workers", 0) for v in workers.values())
    assert sum(v["max_workers"] for v in workers.values()) >= 2, "room for a 2-worker job"


def test_cluster_yaml_runs_the_projects_ray_and_python_and_installs_torch_first():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    image = config["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:([\w.]+)-(py\d+)-(\w+)", image)
    assert m, f"{image}: expected rayproject/ray:<ray>-<python>-<platform>"
    assert m.group(1) == installed_ray_version()
    assert m.group(2) == dockerfile_args()["PYTHON_TAG"]
    check_pip_installs("\n".join(config["setup_commands"]), "cluster.yaml setup_commands", project=str(Path("~/latentforge")))


def test_cluster_yaml_syncs_a_git_export_that_holds_what_setup_needs(tmp_path):
    """file_mounts sync the `git archive` export the README makes; it must hold what setup_commands use
    (`pip install -e`: pyproject, README, packages; `dvc pull prepare`: the DVC files)."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    (remote, local), = config["file_mounts"].items()
    assert (REPO / local).resolve() == EXPORT_DIR
    assert f"/{EXPORT_DIR.name}/" in (INFRA / ".gitignore").read_text().split(), "the export must be git-ignored"
    exports = [line for _, line, args in all_commands("git archive") if args]
    assert exports and all(str(EXPORT_DIR.relative_to(REPO)) in line for line in exports)
    assert any("pip install -q -e ~/latentforge" in c for c in config["setup_commands"]) and remote == "~/latentforge"

    if shutil.which("git") is None or subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout with a commit")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    for rel in ("pyproject.toml", "README.md", "params.yaml", "dvc.yaml", "dvc.lock", ".dvc/config",
                "models/__init__.py", "pipelines/cli.py"):
        assert (tmp_path / rel).is_file(), f"the export lacks {rel}"


# ----------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_args() -> dict[str, str]:
    return dict(rest.strip().split("=", 1) for instruction, rest in dockerfile_instructions()
                if instruction == "ARG" and "=" in rest)


def check_pip_installs(text: str, where: str, project: str) -> None:
    """torch is installed, pinned as in requirements.lock, before the project; no line installs another torch;
    Ray is pinned to the installed version."""
    installs = [(line, args[1:]) for line, args in shell_commands(text, "pip") if args[:1] == ["install"]]
    installs += [(line, args[3:]) for line, args in shell_commands(text, "python -m pip") if args[:1] == ["install"]]
    pin = f"torch=={torch_pin()}"
    torch_at = project_at = None
    for i, (line, args) in enumerate(installs):
        reqs = [a for a in args if not a.startswith("-")]
        torches = [r for r in reqs if re.match(r"torch\b(?![-_])", r)]
        assert all(t == pin for t in torches), f"{where}: {line}: torch must be pinned as {pin}"
        rays = [r for r in reqs if re.match(r"ray(\[[^\]]*\])?(==|>|<|~|!|$)", r)]
        assert all(r.endswith(f"=={installed_ray_version()}") or "RAY_VERSION" in r for r in rays), f"{where}: {line}: Ray unpinned"
        if torches and torch_at is None:
            torch_at = i
        if project in reqs and project_at is None:
            project_at = i
    assert torch_at is not None, f"{where}: torch is never installed"
    assert project_at is not None, f"{where}: the project ({project}) is never installed"
    assert torch_at < project_at, f"{where}: the project is installed before torch: pip would pick a torch build itself"
    assert pin in installs[project_at][1], f"{where}: the project's install must repeat {pin} to keep that build"


def test_dockerfile_installs_pinned_torch_before_the_project_on_the_projects_ray():
    args = dockerfile_args()
    assert args["RAY_VERSION"] == installed_ray_version()
    (base,) = [rest for instruction, rest in dockerfile_instructions() if instruction == "FROM"]
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.split()[0])
    m = re.fullmatch(r"rayproject/ray:([\w.]+)-py(\d)(\d+)-(\w+)", expanded)
    assert m, f"FROM {expanded}: expected an official rayproject/ray:<ray>-py<XY>-<platform> image"
    from packaging.specifiers import SpecifierSet

    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"{m.group(2)}.{m.group(3)}" in SpecifierSet(requires), f"the image's Python {m.group(2)}.{m.group(3)} is outside {requires}"
    runs = "\n".join(rest for instruction, rest in dockerfile_instructions() if instruction == "RUN")
    check_pip_installs(runs, "Dockerfile", project=".")
    # the sources it copies exist, and they are copied before the project is installed
    instructions = dockerfile_instructions()
    for instruction, rest in instructions:
        if instruction == "COPY" and "--from" not in rest:
            for src in [w for w in rest.split() if not w.startswith("--")][:-1]:
                assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
    install_at = next(i for i, (ins, rest) in enumerate(instructions) if ins == "RUN" and re.search(r"pip install .* \.(\s|$)", rest))
    copied = {w.rstrip("/") for ins, rest in instructions[:install_at] if ins == "COPY" for w in rest.split()[:-1] if not w.startswith("--")}
    assert {"pyproject.toml", "README.md", "models", "pipelines", "serving"} <= copied
