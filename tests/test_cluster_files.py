"""The files in cluster/: manifests that start, an image that is what it says, and a local cluster that listens
where docs/clusters.md says.

- The RayJob is validated against KubeRay v1.7's CRD schema (its v1 openAPIV3Schema, descriptions left out,
  kept in tests/schemas/ from ray-project/kuberay ray-operator/config/crd/bases/ray.io_rayjobs.yaml; unknown fields
  refused, as kubectl's strict field validation does) and against the operator's rules that live in Go
  (ray-operator/controllers/ray/utils/validation.go), plus this project's (pinned image, one Ray version,
  a NetworkPolicy that admits only the cluster, its submitter and the operator).
- The autoscaler YAML is validated with Ray's own validator and this project's rules.
- Each rule is shown to refuse a manifest altered to break it.
- A started local cluster's listening sockets, and which of them refuse a caller without the token, are
  compared with the table in docs/clusters.md.
"""

from __future__ import annotations

import copy
import functools
import gzip
import ipaddress
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "cluster"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
AUTOSCALER = CLUSTER / "autoscaler-gpu.yaml"
CRD = REPO / "tests" / "schemas" / "kuberay-v1.7-rayjob-v1.schema.json.gz"
LOCAL = CLUSTER / "local.py"


def pinned_ray() -> str:
    """The Ray version constraints.txt pins, which the image carries."""
    match = re.search(r"^ray==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert match, "constraints.txt pins no ray version"
    return match.group(1)


def version(text: str) -> tuple[int, ...] | None:
    """A Ray version as a tuple, or None when it does not parse (as KubeRay's version.ParseGeneric)."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    return tuple(int(p or 0) for p in match.groups()) if match else None


def image_problems(image: str, where: str) -> list[str]:
    """An image every node can pull as the same bytes: a fixed tag that names the pinned Ray, or a digest."""
    if "@sha256:" in image:
        return []
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    if not tag or tag == "latest":
        return [f"{where}: image {image!r} is not pinned (a fixed tag or @sha256 digest, never :latest)"]
    if name.endswith("rayproject/ray"):
        return [f"{where}: image {image!r} is the bare Ray image; nodes run the fedsim image from cluster/Dockerfile"]
    if f"ray{pinned_ray()}" not in tag:
        return [f"{where}: image tag {tag!r} does not name the Ray it carries (ray{pinned_ray()})"]
    return []


# --- KubeRay ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def crd_schema() -> dict:
    """The RayJob v1 OpenAPI schema as JSON Schema: x-kubernetes-* keys dropped, objects closed to unknown
    fields (the API server prunes them and kubectl's default strict validation refuses them)."""
    def clean(node):
        if isinstance(node, dict):
            out = {k: clean(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
            if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
                out["additionalProperties"] = False
            return out
        return [clean(v) for v in node] if isinstance(node, list) else node

    with gzip.open(CRD, "rt") as f:
        return clean(json.load(f))


def test_the_kept_schema_is_kuberays():
    """tests/schemas/ holds the CRD's v1 schema less its descriptions; where the full CRD is at hand (a shared
    folder beside the repository), the two must agree."""
    full = REPO.parent / "shared" / "cluster-schemas" / "kuberay-v1.7-ray.io_rayjobs.yaml"
    if not full.is_file():
        pytest.skip(f"{full} is not here to compare with")

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "description"}
        return [strip(v) for v in node] if isinstance(node, list) else node

    crd = yaml.load(full.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    served = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    with gzip.open(CRD, "rt") as f:
        assert json.load(f) == strip(served["schema"]["openAPIV3Schema"])


@functools.lru_cache(maxsize=1)
def crd_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crd_schema())


def schema_errors(rayjob: dict) -> list[str]:
    validator = crd_validator()
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(rayjob)]


def rayjob_problems(rayjob: dict) -> list[str]:
    """The KubeRay v1.7 operator's rules that the CRD schema does not express (validation.go
    ValidateRayJobMetadata / ValidateRayJobSpec / ValidateRayClusterSpec), those of the RayJob's submitter,
    and this project's."""
    problems = []
    name = rayjob.get("metadata", {}).get("name", "")
    if len(name) > 47 or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"metadata.name {name!r}: a DNS-1035 label of at most 47 characters (MaxRayJobNameLength)")
    spec = rayjob.get("spec", {})
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        problems.append("suspend needs shutdownAfterJobFinishes")
    cluster = spec.get("rayClusterSpec")
    if cluster is None:
        return problems + ["spec.rayClusterSpec: this project's RayJob brings its own cluster"]
    ray_version = version(cluster.get("rayVersion", ""))
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") != "token":
        problems.append("authOptions.mode: token authentication is this project's default")
    elif ray_version is None:
        problems.append("authOptions.mode is 'token' but rayVersion is missing or unparseable (>= 2.52.0 needed)")
    elif ray_version < (2, 52, 0):
        problems.append(f"authOptions.mode is 'token' but rayVersion {cluster['rayVersion']} < 2.52.0")
    if auth.get("enableK8sTokenAuth"):
        if auth.get("mode") != "token" or ray_version is None or ray_version < (2, 55, 0):
            problems.append("authOptions.enableK8sTokenAuth needs mode token and rayVersion >= 2.55.0")
        if auth.get("secretName"):
            problems.append("authOptions.enableK8sTokenAuth excludes authOptions.secretName")
    if cluster.get("networkPolicy") is not None:
        problems.append("spec.rayClusterSpec.networkPolicy needs the RayClusterNetworkPolicy feature gate")
    if cluster.get("rayVersion") != pinned_ray():
        problems.append(f"rayVersion {cluster.get('rayVersion')!r} is not the Ray the image carries ({pinned_ray()})")

    head = cluster.get("headGroupSpec", {})
    groups = [("head", head)] + [(g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs", [])]
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    for group_name, group in groups:
        params = group.get("rayStartParams") or {}
        containers = group.get("template", {}).get("spec", {}).get("containers", [])
        if not containers:
            problems.append(f"{group_name}: the pod template has no container")
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            problems.append(f"{group_name}: resources set in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{group_name}: rayStartParams['labels'] is not supported (use labels)")
        problems += [p for c in containers[:1] for p in image_problems(c.get("image", ""), f"{group_name}")]
    head_params = head.get("rayStartParams") or {}
    if head_params.get("dashboard-host", "0.0.0.0") in ("127.0.0.1", "localhost", "::1"):
        problems.append("dashboard-host binds the dashboard to the head pod's loopback: the submitter, which comes "
                        "through the head Service, never reaches it and the job is never submitted")
    if str(head_params.get("num-cpus")) != "0":
        problems.append("headGroupSpec.rayStartParams.num-cpus must be '0': no client workers on the head")
    for group in cluster.get("workerGroupSpecs", []):
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        if low > high or not low <= group.get("replicas", low) <= high:
            problems.append(f"{group.get('groupName')}: replicas must lie in [minReplicas, maxReplicas]")
        if low != high and not autoscaling:
            problems.append(f"{group.get('groupName')}: minReplicas/maxReplicas scale nothing without "
                            "enableInTreeAutoscaling: true")
        if group.get("priority") is not None and (ray_version is None or ray_version < (2, 56, 0)):
            problems.append(f"{group.get('groupName')}: priority needs rayVersion >= 2.56.0")
    head_env = (head.get("template", {}).get("spec", {}).get("containers") or [{}])[0].get("env", [])
    if not autoscaling and any(e.get("name") == "RAY_enable_autoscaler_v2" and e.get("value") in ("1", "true")
                               for e in head_env):
        problems.append("RAY_enable_autoscaler_v2 needs enableInTreeAutoscaling: true")
    return problems


def pod_labels(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [t.get("metadata", {}).get("labels", {}) for t in templates]


def networkpolicy_problems(rayjob: dict, policy: dict) -> list[str]:
    """The policy selects every Ray pod of the RayJob and admits only: those pods (any port), the submitter
    Job's pods and the KubeRay operator's namespace (dashboard / client ports)."""
    problems = []
    if policy.get("kind") != "NetworkPolicy" or "Ingress" not in policy["spec"].get("policyTypes", []):
        return ["the second document must be a NetworkPolicy with policyTypes [Ingress]"]
    selector = policy["spec"]["podSelector"].get("matchLabels", {})
    if not selector or not all(selector.items() <= labels.items() for labels in pod_labels(rayjob)):
        problems.append(f"podSelector {selector} does not select every Ray pod of the RayJob")
    dashboard = int((rayjob["spec"]["rayClusterSpec"]["headGroupSpec"].get("rayStartParams") or {})
                    .get("dashboard-port", 8265))
    submitter_admitted = operator_admitted = False
    for rule in policy["spec"].get("ingress", []):
        peers = rule.get("from")
        if not peers:
            problems.append("an ingress rule without `from` admits every source")
            continue
        ports = {p.get("port") for p in rule.get("ports", [])}
        for peer in peers:
            if "ipBlock" in peer:
                problems.append(f"ipBlock {peer['ipBlock']} admits addresses, not the RayJob's pods")
            labels = (peer.get("podSelector") or {}).get("matchLabels", {})
            namespace = (peer.get("namespaceSelector") or {}).get("matchLabels", {})
            if peer.get("namespaceSelector") is not None and not namespace.get("kubernetes.io/metadata.name"):
                problems.append("a namespaceSelector must name one namespace (kubernetes.io/metadata.name)")
            elif namespace:
                operator_admitted = True
                if not ports or not ports <= {dashboard, 10001}:
                    problems.append(f"the operator's namespace may reach the dashboard and client ports only: {ports}")
            elif labels == selector:
                pass  # the cluster's own pods
            elif labels.get("batch.kubernetes.io/job-name") == rayjob["metadata"]["name"] or (
                    labels.get("ray.io/originated-from-cr-name") == rayjob["metadata"]["name"]):
                submitter_admitted = True
                if ports != {dashboard}:
                    problems.append(f"the submitter may reach the dashboard port only, not {ports}")
            else:
                problems.append(f"peer {peer} is neither the cluster, its submitter nor the operator")
    if not submitter_admitted:
        problems.append("the RayJob's submitter is not admitted to the dashboard: the job is never submitted")
    if not operator_admitted:
        problems.append("the KubeRay operator is not admitted to the dashboard")
    return problems


def shipped_rayjob() -> tuple[dict, dict]:
    rayjob, policy = yaml.safe_load_all(RAYJOB.read_text())
    return rayjob, policy


def test_rayjob_fits_the_crd_schema_and_the_operators_rules():
    rayjob, policy = shipped_rayjob()
    assert schema_errors(rayjob) == []
    assert rayjob_problems(rayjob) == []
    assert networkpolicy_problems(rayjob, policy) == []


def test_rayjob_entrypoint_names_configs_the_image_carries():
    rayjob, _ = shipped_rayjob()
    paths = re.findall(r"/home/ray/fedsim/(\S+\.yaml)", rayjob["spec"]["entrypoint"])
    assert paths and all((REPO / p).is_file() for p in paths), paths


def _set(doc: dict, path: str, value) -> dict:
    """A copy of ``doc`` with ``path`` (dots; [i] for list items) set to ``value`` (None deletes it)."""
    doc = copy.deepcopy(doc)
    keys = [int(k) if k.isdigit() else k for k in re.split(r"\.|\[|\]\.?", path) if k != ""]
    node = doc
    for key in keys[:-1]:
        node = node[key]
    if value is None:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return doc


CLUSTER_SPEC = "spec.rayClusterSpec"
RAYJOB_BREAKS = {
    "no rayVersion": (f"{CLUSTER_SPEC}.rayVersion", None, "rayVersion is missing"),
    "old rayVersion": (f"{CLUSTER_SPEC}.rayVersion", "2.51.0", "< 2.52.0"),
    "rayVersion not the image's": (f"{CLUSTER_SPEC}.rayVersion", "2.55.0", "is not the Ray the image carries"),
    "dashboard on loopback": (f"{CLUSTER_SPEC}.headGroupSpec.rayStartParams.dashboard-host", "127.0.0.1",
                              "never reaches it"),
    "replicas without autoscaling": (f"{CLUSTER_SPEC}.enableInTreeAutoscaling", False, "scale nothing"),
    "no token": (f"{CLUSTER_SPEC}.authOptions", None, "token authentication"),
    "k8s token auth and a secret": (f"{CLUSTER_SPEC}.authOptions", {"mode": "token", "enableK8sTokenAuth": True,
                                                                    "secretName": "mine"}, "excludes"),
    "k8s token auth without token mode": (f"{CLUSTER_SPEC}.authOptions", {"enableK8sTokenAuth": True},
                                          ">= 2.55.0"),
    "network policy field": (f"{CLUSTER_SPEC}.networkPolicy", {}, "feature gate"),
    "image :latest": (f"{CLUSTER_SPEC}.headGroupSpec.template.spec.containers[0].image", "org/fedsim:latest",
                      "not pinned"),
    "bare Ray image": (f"{CLUSTER_SPEC}.workerGroupSpecs[0].template.spec.containers[0].image",
                       "rayproject/ray:2.60.0-py311-cu124", "bare Ray image"),
    "client workers on the head": (f"{CLUSTER_SPEC}.headGroupSpec.rayStartParams.num-cpus", "4", "num-cpus"),
    "resources twice": (f"{CLUSTER_SPEC}.headGroupSpec.resources", {"CPU": "4"}, "both rayStartParams"),
    "name too long": ("metadata.name", "fedsim-" + "x" * 41, "at most 47"),
}


@pytest.mark.parametrize("path, value, expected", RAYJOB_BREAKS.values(), ids=RAYJOB_BREAKS.keys())
def test_the_operator_rules_refuse_a_broken_rayjob(path, value, expected):
    rayjob, _ = shipped_rayjob()
    problems = rayjob_problems(_set(rayjob, path, value))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("path, value", [
    (f"{CLUSTER_SPEC}.enableInTreeAutoScaling", True),        # a misspelt field is not silently dropped
    (f"{CLUSTER_SPEC}.authOptions.mode", "bearer"),           # not in the enum
    (f"{CLUSTER_SPEC}.workerGroupSpecs[0].minReplicas", "1"),  # a string where an integer goes
    (f"{CLUSTER_SPEC}.workerGroupSpecs[0].groupName", None),  # required
])
def test_the_crd_schema_refuses_a_broken_rayjob(path, value):
    rayjob, _ = shipped_rayjob()
    assert schema_errors(_set(rayjob, path, value))


@pytest.mark.parametrize("path, value, expected", [
    ("spec.ingress[1].from", None, "admits every source"),
    ("spec.ingress[1].ports", [{"protocol": "TCP", "port": 6379}], "dashboard port only"),
    ("spec.ingress[2].from[0].namespaceSelector", {}, "name one namespace"),
    ("spec.ingress[0].from[0]", {"ipBlock": {"cidr": "0.0.0.0/0"}}, "ipBlock"),
    ("spec.podSelector.matchLabels", {"app": "other"}, "does not select"),
    ("spec.ingress", [], "submitter is not admitted"),
])
def test_the_networkpolicy_rules_refuse_a_wider_policy(path, value, expected):
    rayjob, policy = shipped_rayjob()
    problems = networkpolicy_problems(rayjob, _set(policy, path, value))
    assert any(expected in p for p in problems), problems



# The user of rayproject/ray images, which the fedsim image keeps (cluster/Dockerfile: COPY --chown=ray:users).
IMAGE_USER, IMAGE_GROUP = 1000, 100  # ray, users
SA_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def pod_specs(rayjob: dict) -> list[tuple[str, dict]]:
    """(pod, spec) of every pod template the RayJob defines: head, worker groups, the submitter if given."""
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    if "submitterPodTemplate" in spec:
        pods.append(("submitter", spec["submitterPodTemplate"]["spec"]))
    return pods


def container_problems(where: str, container: dict, pod_context: dict) -> list[str]:
    """No privilege escalation, no capabilities, the runtime's default seccomp profile (here or on the pod)."""
    context = container.get("securityContext") or {}
    problems = []
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
    if "ALL" not in (context.get("capabilities") or {}).get("drop", []):
        problems.append(f"{where}: securityContext.capabilities must drop [ALL]")
    if (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: securityContext.seccompProfile must be RuntimeDefault")
    if context.get("privileged") or context.get("runAsUser") == 0 or context.get("runAsNonRoot") is False:
        problems.append(f"{where}: the container overrides the pod's non-root user")
    return problems


def writes_a_claim(spec: dict) -> bool:
    claims = {v["name"] for v in spec.get("volumes", [])
              if "persistentVolumeClaim" in v and not v["persistentVolumeClaim"].get("readOnly")}
    return any(m["name"] in claims and not m.get("readOnly") for c in spec["containers"]
               for m in c.get("volumeMounts", []))


def pod_security_problems(rayjob: dict) -> list[str]:
    """Every pod runs as the image's non-root user with hardened containers and no ServiceAccount token; the
    head's autoscaler, the one container that needs the Kubernetes API, gets a projected token of its own."""
    problems = []
    cluster = rayjob["spec"]["rayClusterSpec"]
    autoscaler = cluster.get("autoscalerOptions") or {}
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    for pod, spec in pod_specs(rayjob):
        context = spec.get("securityContext") or {}
        if context.get("runAsNonRoot") is not True:
            problems.append(f"{pod}: securityContext.runAsNonRoot must be true")
        if (context.get("runAsUser"), context.get("runAsGroup")) != (IMAGE_USER, IMAGE_GROUP):
            problems.append(f"{pod}: securityContext runAsUser/runAsGroup must be the image's ray/users "
                            f"({IMAGE_USER}/{IMAGE_GROUP}), not {context.get('runAsUser')}/{context.get('runAsGroup')}")
        if writes_a_claim(spec) and context.get("fsGroup") != IMAGE_GROUP:
            problems.append(f"{pod}: securityContext.fsGroup must be {IMAGE_GROUP}: the claim it writes to is "
                            "not writable by the pod's user otherwise")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{pod}: automountServiceAccountToken must be false: job code would hold a "
                            "Kubernetes API token")
        for container in spec.get("initContainers", []) + spec["containers"]:
            problems += container_problems(f"{pod}/{container['name']}", container, context)
        if pod == "head" and autoscaling:
            problems += container_problems("head/autoscaler (autoscalerOptions)", autoscaler, context)
            problems += autoscaler_token_problems(spec, autoscaler)
    return problems


def autoscaler_token_problems(head: dict, autoscaler: dict) -> list[str]:
    """With no token automounted, the autoscaler needs a projected one at the path Ray's KubeRay node provider
    reads, and no other container of the head may mount it."""
    if head.get("automountServiceAccountToken") is not False:
        return []
    problems = []
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    mounted = [m["name"] for m in autoscaler.get("volumeMounts", []) if m["mountPath"].rstrip("/") == SA_TOKEN_DIR]
    sources = [s for name in mounted for s in volumes.get(name, {}).get("projected", {}).get("sources", [])]
    if not any("serviceAccountToken" in s for s in sources):
        problems.append(f"the autoscaler has no ServiceAccount token at {SA_TOKEN_DIR}: it cannot scale the "
                        "worker group")
    for container in head["containers"]:
        if any(m["mountPath"].rstrip("/") == SA_TOKEN_DIR for m in container.get("volumeMounts", [])):
            problems.append(f"head/{container['name']} mounts the API token: job code could use it")
    return problems


def test_rayjob_pods_are_hardened():
    rayjob, _ = shipped_rayjob()
    assert {pod for pod, _ in pod_specs(rayjob)} == {"head", "gpu", "submitter"}
    assert pod_security_problems(rayjob) == []


HEAD_POD = f"{CLUSTER_SPEC}.headGroupSpec.template.spec"
GPU_POD = f"{CLUSTER_SPEC}.workerGroupSpecs[0].template.spec"
SUBMITTER_POD = "spec.submitterPodTemplate.spec"
POD_SECURITY_BREAKS = {
    "head may run as root": (f"{HEAD_POD}.securityContext.runAsNonRoot", None, "head: securityContext.runAsNonRoot"),
    "worker as root": (f"{GPU_POD}.securityContext.runAsUser", 0, "gpu: securityContext runAsUser/runAsGroup"),
    "submitter in another group": (f"{SUBMITTER_POD}.securityContext.runAsGroup", 0, "submitter: securityContext"),
    "results not writable": (f"{HEAD_POD}.securityContext.fsGroup", None, "head: securityContext.fsGroup"),
    "worker holds a token": (f"{GPU_POD}.automountServiceAccountToken", None, "gpu: automountServiceAccountToken"),
    "submitter holds a token": (f"{SUBMITTER_POD}.automountServiceAccountToken", True,
                                "submitter: automountServiceAccountToken"),
    "head escalates": (f"{HEAD_POD}.containers[0].securityContext.allowPrivilegeEscalation", True,
                       "head/ray-head: securityContext.allowPrivilegeEscalation"),
    "worker keeps capabilities": (f"{GPU_POD}.containers[0].securityContext.capabilities", {"drop": ["NET_RAW"]},
                                  "gpu/ray-worker: securityContext.capabilities"),
    "submitter unconfined": (f"{SUBMITTER_POD}.containers[0].securityContext.seccompProfile",
                             {"type": "Unconfined"}, "submitter/ray-job-submitter: securityContext.seccompProfile"),
    "worker container as root": (f"{GPU_POD}.containers[0].securityContext.runAsUser", 0, "overrides the pod's"),
    "autoscaler not hardened": (f"{CLUSTER_SPEC}.autoscalerOptions.securityContext", None, "head/autoscaler"),
    "autoscaler without token": (f"{CLUSTER_SPEC}.autoscalerOptions.volumeMounts", None, "cannot scale"),
    "token for job code": (f"{HEAD_POD}.containers[0].volumeMounts", [
        {"name": "results", "mountPath": "/results"},
        {"name": "autoscaler-api-token", "mountPath": SA_TOKEN_DIR, "readOnly": True}], "job code could use it"),
}


@pytest.mark.parametrize("path, value, expected", POD_SECURITY_BREAKS.values(), ids=POD_SECURITY_BREAKS.keys())
def test_the_pod_security_rules_refuse_a_weaker_rayjob(path, value, expected):
    rayjob, _ = shipped_rayjob()
    broken = _set(rayjob, path, value)
    assert schema_errors(broken) == []  # a manifest the API server takes: only the rules stand in the way
    problems = pod_security_problems(broken)
    assert any(expected in p for p in problems), problems


# The cloud instance metadata service (AWS, GCP, Azure, ...; AWS's IPv6 endpoint): it hands the node's cloud
# credentials to any process that asks.
METADATA = [ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_network("fd00:ec2::254/128")]


def egress_problems(policy: dict) -> list[str]:
    """The policy limits egress: no rule reaches the metadata service; the cluster's own pods (every port),
    DNS and HTTPS (model hub, Kubernetes API) are reachable."""
    spec = policy["spec"]
    if "Egress" not in spec.get("policyTypes", []):
        return ["policyTypes lacks Egress: the pods may connect anywhere, the metadata service included"]
    problems = []
    selector = spec["podSelector"].get("matchLabels", {})
    cluster_reached, reached = False, set()
    for rule in spec.get("egress", []):
        peers = rule.get("to")
        ports = {(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports", [])}
        if not peers:
            problems.append("an egress rule without `to` reaches every address, the metadata service included")
            continue
        for peer in peers:
            if "ipBlock" in peer:
                problems += [f"ipBlock {peer['ipBlock']['cidr']} reaches the metadata service {meta}"
                             for meta in metadata_in(peer["ipBlock"])]
                reached |= ports
            elif (peer.get("podSelector") or {}).get("matchLabels") == selector and "namespaceSelector" not in peer:
                cluster_reached = cluster_reached or not ports
    if not cluster_reached:
        problems.append("the cluster's own pods are not reachable on every port")
    if not {("UDP", 53), ("TCP", 53)} <= reached:
        problems.append("DNS (UDP and TCP 53) is not reachable: no host name resolves")
    if ("TCP", 443) not in reached:
        problems.append("HTTPS (TCP 443) is not reachable: no model from the hub, no autoscaling")
    return problems


def metadata_in(block: dict) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The metadata addresses an ipBlock reaches: inside its cidr and not in an except."""
    network = ipaddress.ip_network(block["cidr"])
    excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
    return [meta for meta in METADATA if meta.version == network.version and meta.subnet_of(network)
            and not any(meta.version == e.version and meta.subnet_of(e) for e in excepted)]


def test_the_networkpolicy_keeps_the_pods_from_the_metadata_service():
    _, policy = shipped_rayjob()
    assert egress_problems(policy) == []


@pytest.mark.parametrize("path, value, expected", [
    ("spec.policyTypes", ["Ingress"], "lacks Egress"),
    ("spec.egress[1].to[0].ipBlock.except", None, "169.254.169.254/32"),
    ("spec.egress[1].to[1].ipBlock.except", ["fd00::/64"], "fd00:ec2::254/128"),
    ("spec.egress[1].to", None, "without `to`"),
    ("spec.egress[1].ports", [{"protocol": "TCP", "port": 443}], "DNS"),
    ("spec.egress[1].ports", [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}], "HTTPS"),
    ("spec.egress[0].ports", [{"protocol": "TCP", "port": 6379}], "own pods"),
])
def test_the_egress_rules_refuse_a_wider_or_broken_policy(path, value, expected):
    _, policy = shipped_rayjob()
    problems = egress_problems(_set(policy, path, value))
    assert any(expected in p for p in problems), problems


# --- Ray autoscaler -----------------------------------------------------------------------------------------

def ray_validate(config: dict) -> None:
    """Ray's own validation of a `ray up` YAML (the schema in the ray wheel), offline."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def autoscaler_problems(config: dict) -> list[str]:
    problems = []
    head = config["available_node_types"][config["head_node_type"]]
    if head.get("resources", {}).get("CPU") != 0:
        problems.append("the head node type must declare resources {CPU: 0}: client workers would land on it")
    docker = config.get("docker", {})
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            problems += image_problems(docker[key], f"docker.{key}")
    for name, node_type in config["available_node_types"].items():
        if "image" in node_type.get("docker", {}) or "worker_image" in node_type.get("docker", {}):
            problems.append(f"{name}: every node runs the one image in docker.image")
    if not docker.get("image"):
        problems.append("docker.image: every node runs the image built from cluster/Dockerfile")
    tokens = [target for target in config.get("file_mounts", {}) if target.endswith(".ray/auth_token")]
    if not tokens:
        problems.append("no file_mount puts the token at ~/.ray/auth_token")
    for target in tokens:
        if not (target.startswith("~/") or target.startswith("/home/ray/")):
            problems.append(f"token mounted at {target}: inside rayproject/ray the home is /home/ray and the "
                            "Docker runner expands only ~")
    if "RAY_AUTH_MODE=token" not in " ".join(docker.get("run_options", [])):
        problems.append("docker.run_options must set RAY_AUTH_MODE=token for every process in the container")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config.get(key, []) if "ray start" in c]
        if not starts or not all("RAY_AUTH_MODE=token" in c for c in starts):
            problems.append(f"{key}: ray start without RAY_AUTH_MODE=token")
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        for command in config.get(key, []):
            if re.search(r"pip3? install|git\+|git clone|conda install", command):
                problems.append(f"{key}: {command!r} installs at start; nodes started later could differ")
    head_start = " ".join(config.get("head_start_ray_commands", []))
    if "--dashboard-host=127.0.0.1" not in head_start:
        problems.append("the head's dashboard must stay on loopback (reached through `ray dashboard`)")
    return problems


def shipped_autoscaler() -> dict:
    return yaml.safe_load(AUTOSCALER.read_text())


def test_autoscaler_yaml_passes_rays_validator_and_our_rules():
    config = shipped_autoscaler()
    ray_validate(config)
    assert autoscaler_problems(config) == []


AUTOSCALER_BREAKS = {
    "head advertises CPUs": ("available_node_types.head.resources", {"CPU": 8, "GPU": 0}, "CPU: 0"),
    "token under /home/ubuntu": ("file_mounts", {"/home/ubuntu/.ray/auth_token": "~/.ray/auth_token"},
                                 "expands only ~"),
    "no token": ("file_mounts", {}, "no file_mount"),
    "image :latest": ("docker.image", "org/fedsim:latest", "not pinned"),
    "untagged image": ("docker.image", "org/fedsim", "not pinned"),
    "bare Ray image": ("docker.image", "rayproject/ray:2.60.0-py311-cu124", "bare Ray image"),
    "pip from git at start": ("setup_commands", ["pip install 'fedsim @ git+https://example.org/fedsim.git'"],
                              "installs at start"),
    "worker without token mode": ("worker_start_ray_commands", ["ray start --address=$RAY_HEAD_IP:6379"],
                                  "without RAY_AUTH_MODE"),
    "dashboard opened": ("head_start_ray_commands", [
        "RAY_AUTH_MODE=token ray start --head --port=6379 --dashboard-host=0.0.0.0"], "loopback"),
}


@pytest.mark.parametrize("path, value, expected", AUTOSCALER_BREAKS.values(), ids=AUTOSCALER_BREAKS.keys())
def test_our_rules_refuse_a_broken_autoscaler_yaml(path, value, expected):
    problems = autoscaler_problems(_set(shipped_autoscaler(), path, value))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("path, value", [
    ("available_node_types.gpu1.resources", "GPU=1"),   # not a mapping
    ("max_workers", "many"),
    ("provider", None),                                 # required
])
def test_rays_validator_refuses_a_broken_autoscaler_yaml(path, value):
    with pytest.raises(Exception):
        ray_validate(_set(shipped_autoscaler(), path, value))


# --- the image ----------------------------------------------------------------------------------------------

def dockerfile_problems(text: str) -> list[str]:
    problems = []
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    base = re.search(r"^FROM\s+rayproject/ray:(\d+\.\d+\.\d+)\S*", text, re.M)
    if not base or base.group(1) != pinned_ray():
        problems.append(f"FROM must be rayproject/ray:{pinned_ray()}-..., the Ray constraints.txt pins")
    installs = re.findall(r"pip3? install[^\n&]*", text.replace("\\\n", " "))
    if not installs:
        problems.append("the Dockerfile installs nothing")
    problems += [f"{line.strip()!r} without -c constraints.txt" for line in installs
                 if "-c constraints.txt" not in line]
    return problems


def test_the_image_ray_the_manifests_and_constraints_agree():
    text = (CLUSTER / "Dockerfile").read_text()
    assert dockerfile_problems(text) == []
    images = {shipped_autoscaler()["docker"]["image"]}
    rayjob, _ = shipped_rayjob()
    images |= {c["image"] for _, spec in pod_specs(rayjob) for c in spec["containers"]}
    assert len(images) == 1, f"one image on every node and the submitter, in both manifests: {images}"
    assert f"fedsim:0.1.0-ray{pinned_ray()}" in (CLUSTER / "Dockerfile").read_text()


@pytest.mark.parametrize("old, new, expected", [
    ("-c constraints.txt", "", "without -c constraints.txt"),
    ("rayproject/ray:2.60.0", "rayproject/ray:2.52.0", "FROM must be"),
])
def test_dockerfile_rules_refuse_a_broken_dockerfile(old, new, expected):
    text = (CLUSTER / "Dockerfile").read_text()
    assert old in text
    assert any(expected in p for p in dockerfile_problems(text.replace(old, new)))


def dockerignore_rules(text: str) -> list[tuple[re.Pattern, bool]]:
    """.dockerignore patterns as Docker reads them: from the context root, `**` any depth, `!` re-includes."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = os.path.normpath(line[1:] if keep else line).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((re.compile(regex + r"\Z"), keep))
    return rules


def ignored(rules: list[tuple[re.Pattern, bool]], path: str) -> bool:
    """Whether Docker leaves ``path`` out of the context: the last rule matching it or a parent folder wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    verdict = False
    for regex, keep in rules:
        if any(regex.match(c) for c in candidates):
            verdict = not keep
    return verdict


SECRETS = [".ray/auth_token", "auth_token", "cluster/auth_token", ".env", "cluster/.env.local", "id_rsa",
           "deploy/tls.key", "deploy/cert.pem", ".aws/credentials", ".kube/config", "kubeconfig.yaml",
           "secrets/token.txt", "experiments/my_secret.yaml"]
MUST_LEAVE_OUT = [
    "runs/quickstart-20260101/summary.json", "experiments/runs/x/metrics.jsonl", "data/hateful_memes/img/01.png",
    ".venv/bin/python", ".venv-gpu/lib/site.py", "venv/bin/python", ".git/config", ".pytest_cache/v/x",
    "fedsim/__pycache__/config.cpython-311.pyc", "fedsim.egg-info/PKG-INFO", *SECRETS,
]
MUST_KEEP = ["fedsim/config.py", "fedsim/data/real/base.py", "fedsim/checkpoint.py",
             "fedsim/models/tiny_preset/model.safetensors", "actors/executor.py", "experiments/quickstart.yaml",
             "experiments/fedmllm/gpu.yaml", "setup.cfg", "pyproject.toml", "constraints.txt", "README.md",
             "cluster/Dockerfile", "cluster/local.py"]


def dockerignore_problems(text: str) -> list[str]:
    rules = dockerignore_rules(text)
    return ([f"{p} is sent to the image build" for p in MUST_LEAVE_OUT if not ignored(rules, p)]
            + [f"{p} is left out of the image" for p in MUST_KEEP if ignored(rules, p)])


def test_dockerignore_keeps_runs_data_venvs_and_secrets_out():
    text = (REPO / ".dockerignore").read_text()
    assert dockerignore_problems(text) == []
    rules = dockerignore_rules(text)
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", (CLUSTER / "Dockerfile").read_text(), re.M)
    sources = [REPO / s for line in copied for s in line.split()]
    files = [f for s in sources for f in ([s] if s.is_file() else s.rglob("*"))
             if f.is_file() and "__pycache__" not in f.parts]
    assert files and not [f for f in files if ignored(rules, f.relative_to(REPO).as_posix())]


def test_dockerignore_rules_refuse_a_leaky_file():
    text = (REPO / ".dockerignore").read_text()
    leaky = "\n".join(line for line in text.splitlines() if "runs" not in line and "auth_token" not in line)
    problems = dockerignore_problems(leaky)
    assert any(p.startswith("runs/") for p in problems) and any("auth_token" in p for p in problems)
    assert any("fedsim/config.py" in p for p in dockerignore_problems(text + "\n**/*.py\n"))
    assert not ignored(dockerignore_rules("runs\n!runs/keep.txt\n"), "runs/keep.txt")


def secret_patterns(dockerignore: str) -> list[str]:
    """The patterns of .dockerignore's secrets section (from its '# Secrets' comment to the next blank line)."""
    section = dockerignore.split("\n# Secrets", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in section.splitlines()[1:] if line.strip() and not line.startswith("#")]


def uploaded_by_ray(root: Path) -> set[str]:
    """The files under ``root`` that `ray job submit --working-dir root` uploads: Ray's own walk of the folder
    with its .rayignore (and .gitignore) files applied."""
    from ray._private.runtime_env.packaging import _dir_travel

    files: set[str] = set()
    _dir_travel(root, [], lambda p: p.is_file() and files.add(p.relative_to(root).as_posix()), include_gitignore=True)
    return files


def test_rayignore_keeps_the_secrets_dockerignore_keeps_out_of_the_job_upload(tmp_path):
    """The working directory ships to the cluster (into the GCS, readable by every job): the secrets the image
    build leaves out stay out of it too, by the same patterns, as Ray reads them."""
    patterns = secret_patterns((REPO / ".dockerignore").read_text())
    rayignore = (REPO / ".rayignore").read_text()
    assert "**/auth_token" in patterns
    assert set(patterns) <= {line.strip() for line in rayignore.splitlines()}
    left_out = SECRETS + ["data/hateful_memes/img/01.png", "experiments/hateful_memes.zip"]
    for path in left_out + MUST_KEEP:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    (tmp_path / ".rayignore").write_text(rayignore)
    uploaded = uploaded_by_ray(tmp_path)
    assert not uploaded & set(left_out), uploaded & set(left_out)
    assert set(MUST_KEEP) <= uploaded  # fedsim/data/ included: the job imports fedsim from the upload


def test_gpu_configs_read_data_from_an_absolute_path():
    datasets = sorted((REPO / "experiments/fedmllm/datasets").glob("*.yaml"))
    for path in [REPO / "experiments/fedmllm/gpu.yaml", *datasets]:
        data = yaml.safe_load(path.read_text()).get("data", {})
        assert Path(data["path"]).is_absolute(), f"{path.name}: data.path {data['path']!r} travels with --working-dir"


# --- what a local cluster listens on ------------------------------------------------------------------------

def documented_listeners() -> list[dict]:
    """The table in docs/clusters.md: listener, port expression, node kind, where it binds in each mode, token."""
    lines = (CLUSTER.parent / "docs" / "clusters.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| listener | port |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        name, port, node, loopback, interface, token = [c.strip() for c in line.strip("|").split("|")]
        terms = re.findall(r"`([PDN])(?:\+(\d+))?`", port)
        rows.append({"name": name, "terms": [(t, int(k or 0)) for t, k in terms], "head_only": node == "head",
                     "loopback": _classes(loopback), "interface": _classes(interface), "token": token == "yes"})
    return rows


def _classes(cell: str) -> set[str]:
    """'node IP, 127.0.0.1 (note)' -> {'node', 'loopback'}."""
    names = {"127.0.0.1": "loopback", "all interfaces": "all", "node IP": "node"}
    return {names[part.strip()] for part in re.sub(r"\(.*\)", "", cell).split(",")}


def _address_class(address: str, node_ip: str) -> str:
    ip = ipaddress.ip_address(address)
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if ip.is_unspecified:
        return "all"
    if ip.is_loopback:
        return "loopback"
    return "node" if str(ip) == node_ip else f"unexpected {address}"


def _row_for(rows: list[dict], port: int, base: int, dashboard: int, node_base: int) -> dict | None:
    values = {"P": base, "D": dashboard, "N": node_base}
    for row in rows:
        ports = [values[t] + k for t, k in row["terms"]]
        if (len(ports) == 1 and port == ports[0]) or (len(ports) == 2 and ports[0] <= port <= ports[1]):
            return row
    return None


@contextmanager
def local_cluster(tmp_path: Path, port: int, loopback: bool, workers: int, head_cpus: int):
    env = {**os.environ, "FEDSIM_LOCAL_CLUSTER": str(tmp_path / f"cluster-{port}" / "state.json"),
           "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    if loopback:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    else:
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    try:
        done = subprocess.run([sys.executable, str(LOCAL), "start", f"--workers={workers}", "--cpus-per-node=1",
                               "--gpus-per-node=0", f"--head-cpus={head_cpus}", f"--port={port}",
                               f"--dashboard-port={port + 2}"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        yield env, json.loads(done.stdout)
    finally:
        subprocess.run([sys.executable, str(LOCAL), "stop", "--grace", "3"], env=env, capture_output=True, timeout=120)


_HOLD_AN_ACTOR = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
@ray.remote(num_cpus=1)
class Probe:
    def ip(self):
        return ray.util.get_node_ip_address()
probe = Probe.remote()
print(json.dumps({"node_ip": ray.get(probe.ip.remote())}), flush=True)
sys.stdin.read()  # keep the actor (a worker process) and this driver alive until the test is done
"""


def cluster_listeners(env: dict, info: dict) -> tuple[list[dict], str, int]:
    """Listening sockets of every node's processes and of a driver holding an actor; the node IP; the driver."""
    import psutil

    driver = subprocess.Popen([sys.executable, "-c", _HOLD_AN_ACTOR, info["address"]], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        node_ip = json.loads(driver.stdout.readline())["node_ip"]
        done = subprocess.run([sys.executable, str(LOCAL), "listeners"], env=env, capture_output=True, text=True,
                              timeout=60)
        rows = json.loads(done.stdout)
        rows += [{"node": "driver", "pid": driver.pid, "address": c.laddr.ip, "port": c.laddr.port}
                 for c in psutil.Process(driver.pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        return rows, node_ip, driver
    except BaseException:
        driver.kill()
        raise


def check_listeners(rows: list[dict], info: dict, node_ip: str, mode: str) -> dict[str, list[tuple[int, str]]]:
    """Every socket is a documented listener bound as docs/clusters.md says; returns {listener: [(port, address)]}."""
    doc = documented_listeners()
    base, dashboard = info["port"], int(info["dashboard"].rsplit(":", 1)[1])
    nodes = {n["name"]: base + 1000 + (0 if n["name"] == "head" else 100 * (int(n["name"][6:]) + 1))
             for n in info["nodes"]}
    seen: dict[tuple[str, str], set[str]] = {}
    found: dict[str, list[tuple[int, str]]] = {}
    for sock in rows:
        if sock["node"] == "driver":  # a driver's port lies in the worker range of one of the nodes
            row, node = next(((r, n) for n, first in nodes.items()
                              if (r := _row_for(doc, sock["port"], base, dashboard, first))
                              and r["name"].startswith("worker")), (None, None))
        else:
            node, row = sock["node"], _row_for(doc, sock["port"], base, dashboard, nodes[sock["node"]])
        assert row, f"undocumented listener: {sock}"
        assert node == "head" or not row["head_only"], f"{row['name']} on {node}: {sock}"
        seen.setdefault((row["name"], f"{node}:{sock['port']}"), set()).add(_address_class(sock["address"], node_ip))
        found.setdefault(row["name"], []).append((sock["port"], sock["address"]))
    for (name, where), classes in seen.items():
        expected = next(r[mode] for r in doc if r["name"] == name)
        assert classes == expected, f"{name} at {where} listens on {classes}, docs/clusters.md says {expected}"
    missing = {r["name"] for r in doc} - {name for name, _ in seen}
    assert not missing, f"documented but not listening: {missing}"
    return found


def token_required(name: str, port: int, address: str) -> bool:
    """Whether the listener refuses a caller that brings a wrong token (gRPC UNAUTHENTICATED, HTTP 401/403)."""
    import grpc

    host = "127.0.0.1" if ipaddress.ip_address(address).is_unspecified else address.removeprefix("::ffff:")
    grpc_methods = {"GCS": "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "Ray Client server":
                    "/ray.rpc.RayletDriver/ClusterInfo", "raylet": "/ray.rpc.NodeManagerService/GetSystemConfig",
                    "object manager": "/ray.rpc.ObjectManagerService/Pull",
                    "dashboard agent, gRPC": "/ray.rpc.ReporterService/HealthCheck",
                    "worker processes, drivers": "/ray.rpc.CoreWorkerService/GetCoreWorkerStats"}
    if name in grpc_methods:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            call = channel.unary_unary(grpc_methods[name], request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            try:
                call(b"", timeout=10, metadata=[("authorization", "Bearer not-the-token")])
            except grpc.RpcError as error:
                return error.code() == grpc.StatusCode.UNAUTHENTICATED
            return False
    path = "/metrics" if "metrics" in name else "/api/version"
    request = urllib.request.Request(f"http://{host}:{port}{path}", headers={"Authorization": "Bearer not-the-token"})
    try:
        urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as error:
        return error.code in (401, 403)
    return False


def test_the_listener_check_refuses_an_exposed_undocumented_or_missing_socket():
    """On sockets made up from the table of docs/clusters.md: it passes as is, and fails once one moves."""
    info = {"port": 6800, "dashboard": "http://127.0.0.1:6802", "nodes": [{"name": "head"}]}
    values = {"P": 6800, "D": 6802, "N": 7800}
    rows = [{"node": "head", "address": "127.0.0.1", "port": values[row["terms"][0][0]] + row["terms"][0][1]}
            for row in documented_listeners()]
    check_listeners(rows, info, "192.0.2.2", "loopback")
    exposed = [dict(r, address="0.0.0.0") if r["port"] == 6800 else r for r in rows]
    with pytest.raises(AssertionError, match="GCS at head:6800 listens on {'all'}"):
        check_listeners(exposed, info, "192.0.2.2", "loopback")
    with pytest.raises(AssertionError, match="undocumented listener"):
        check_listeners(rows + [{"node": "head", "address": "127.0.0.1", "port": 44217}], info, "192.0.2.2",
                        "loopback")
    with pytest.raises(AssertionError, match="documented but not listening: {'metrics export'}"):
        check_listeners([r for r in rows if r["port"] != 7802], info, "192.0.2.2", "loopback")


@pytest.mark.slow
def test_a_loopback_local_cluster_listens_where_the_readme_says(tmp_path):
    """Head and a worker node with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: every socket of every node, worker
    and driver process is on 127.0.0.1, each is a listener docs/clusters.md lists, and its token column
    is what each answers to a caller with a wrong token."""
    with local_cluster(tmp_path, 6800, loopback=True, workers=1, head_cpus=0) as (env, info):
        assert info["loopback"] and info["client_env"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
        rows, node_ip, driver = cluster_listeners(env, info)
        try:
            assert node_ip == "127.0.0.1"
            assert not [r for r in rows if _address_class(r["address"], node_ip) != "loopback"]
            found = check_listeners(rows, info, node_ip, "loopback")
            documented = {r["name"]: r["token"] for r in documented_listeners()}
            answers = {name: token_required(name, *socks[0]) for name, socks in found.items()}
            assert answers == documented
        finally:
            driver.kill()


@pytest.mark.slow
def test_without_the_variable_the_cluster_listens_as_a_real_clusters_nodes(tmp_path):
    """Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray advertises the interface address and binds as on every
    node of a real cluster: the right-hand column of docs/clusters.md, socket by socket."""
    from ray._raylet import node_ip_address_from_perspective

    if ipaddress.ip_address(node_ip_address_from_perspective(None)).is_loopback:
        pytest.skip("this machine has no network interface besides loopback")
    with local_cluster(tmp_path, 7100, loopback=False, workers=0, head_cpus=1) as (env, info):
        assert not info["loopback"] and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in info["client_env"]
        rows, node_ip, driver = cluster_listeners(env, info)
        try:
            assert not ipaddress.ip_address(node_ip).is_loopback
            check_listeners(rows, info, node_ip, "interface")
        finally:
            driver.kill()


def test_the_local_cluster_refuses_to_start_without_token_authentication(tmp_path):
    """RAY_AUTH_MODE=disabled is refused with a message naming it, before any node starts."""
    state = tmp_path / "state.json"
    env = {**os.environ, "FEDSIM_LOCAL_CLUSTER": str(state), "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(LOCAL), "start", "--workers=0", "--port=7400"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "RAY_AUTH_MODE='disabled'" in done.stderr and "token authentication only" in done.stderr
    assert not state.exists()
