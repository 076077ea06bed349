"""The cluster recipes under cluster/, checked offline: the Ray launcher YAML against Ray's own schema
and config checks, the KubeRay manifests against what the operator validates, the MLflow server's
flags and secrets, the image. Each check is a small function raising ValueError, and each is also
shown to reject a broken copy, so none of them can pass vacuously."""

import configparser
import copy
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import tomllib
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from .conftest import REPO

CLUSTER = os.path.join(REPO, "cluster")
MLFLOW = os.path.join(CLUSTER, "mlflow")
IMAGE_PROJECT_DIR = "/home/ray/t5adapt"  # WORKDIR of cluster/Dockerfile


def read(*parts) -> str:
    with open(os.path.join(CLUSTER, *parts)) as f:
        return f.read()


def load_docs(*parts) -> list:
    return [doc for doc in yaml.safe_load_all(read(*parts)) if doc is not None]


def version_tuple(text: str) -> tuple:
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text).groups(default="0"))


def check_install_order(commands: list) -> None:
    """The Makefile's order: torch first, then deepspeed without build isolation (or its build
    environment pulls a second torch), then the project."""
    def first(pattern: str) -> int:
        found = [index for index, command in enumerate(commands) if re.search(pattern, command)]
        if not found:
            raise ValueError(f"no install command matches {pattern!r}")
        return found[0]

    torch, deepspeed = first(r"pip install .*\btorch=="), first(r"pip install .*\bdeepspeed\b")
    project = first(r"pip install (-q |--no-cache-dir )*(\.|~/t5adapt)(\s|$)")
    if "--no-build-isolation" not in commands[deepspeed]:
        raise ValueError("deepspeed must be installed with --no-build-isolation")
    if not torch < deepspeed < project:
        raise ValueError("install torch, then deepspeed, then the project")


# -- secrets: nothing under cluster/ may look like a credential ------------------------------------

SECRET_PATTERNS = {
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "an AWS secret key with a value": re.compile(r"aws_secret_access_key\s*[=:]\s*[\"']?[A-Za-z0-9/+]", re.I),
    "a token-like hex string": re.compile(r"\b[0-9a-fA-F]{32,}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a Ray token literal": re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*[\"']?[^\s\"'$]"),
    "MLflow's old default admin password": re.compile(r"password1234"),
}


def check_no_secrets(text: str, where: str) -> None:
    for what, pattern in SECRET_PATTERNS.items():
        found = pattern.search(text)
        if found:  # the line, never the match: a real secret must not reach the test log
            line = text.count("\n", 0, found.start()) + 1
            raise ValueError(f"{where}:{line} holds {what}: use a Secret, a file or an env reference")


def recipe_files() -> list:
    """Every file under cluster/ except what a user creates locally and git ignores (.env, secrets/)."""
    paths = []
    for directory, dirs, names in os.walk(CLUSTER):
        dirs[:] = [d for d in dirs if d not in ("secrets", "__pycache__")]
        paths += [os.path.join(directory, n) for n in names if n != ".env"]
    return sorted(paths)


def test_no_file_under_cluster_holds_a_secret():
    files = recipe_files()
    assert len(files) >= 12
    for path in files:
        with open(path) as f:
            check_no_secrets(f.read(), os.path.relpath(path, REPO))


@pytest.mark.parametrize("leak", [
    "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
    "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "RAY_AUTH_TOKEN=3f6c1e0a9b8d7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e",
    "admin_password = password1234",
    "-----BEGIN OPENSSH PRIVATE KEY-----",
])
def test_secret_scan_catches_leaks(leak):
    with pytest.raises(ValueError, match="a copy:2 holds"):
        check_no_secrets(f"safe: line\n{leak}\n", "a copy")


def test_secret_scan_allows_references():
    check_no_secrets("RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token\nexport RAY_AUTH_TOKEN=$(cat f)\n"
                     "- name: AWS_SECRET_ACCESS_KEY\n  valueFrom: {secretKeyRef: {name: a, key: b}}\n", "refs")


# -- cluster/aws.yaml: the Ray cluster launcher ----------------------------------------------------

GPU_INSTANCE_FAMILIES = {"g4dn", "g5", "g6", "g6e", "gr6", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en", "p6-b200"}


def ray_schema() -> dict:
    ray_dir = importlib.util.find_spec("ray").submodule_search_locations[0]
    with open(os.path.join(ray_dir, "autoscaler", "ray-schema.json")) as f:
        return json.load(f)


def aws_config() -> dict:
    return yaml.safe_load(read("aws.yaml"))


def check_node_types(cfg: dict) -> None:
    types = cfg["available_node_types"]
    if cfg["head_node_type"] not in types:
        raise ValueError(f"head_node_type {cfg['head_node_type']!r} is not one of available_node_types {sorted(types)}")
    for name, node in types.items():
        low, high = node.get("min_workers", 0), node.get("max_workers", cfg["max_workers"])
        if low > high:
            raise ValueError(f"available_node_types.{name}: min_workers {low} > max_workers {high}")
    gpu_types = [name for name, node in types.items() if name != cfg["head_node_type"]
                 and node["resources"].get("GPU", 0) > 0
                 and node["node_config"]["InstanceType"].split(".")[0] in GPU_INSTANCE_FAMILIES]
    if not gpu_types:
        raise ValueError("no worker type has resources.GPU > 0 on a GPU instance type")
    for name, node in types.items():
        if "IamInstanceProfile" not in node["node_config"]:
            raise ValueError(f"available_node_types.{name}.node_config has no IamInstanceProfile (S3 needs it)")


def ray_start_commands(cfg: dict, key: str) -> list:
    commands = [c for c in cfg[key] if "ray start" in c]
    if not commands:
        raise ValueError(f"{key} never runs `ray start`")
    return commands


def check_token_auth(cfg: dict) -> None:
    """Every `ray start` runs with RAY_AUTH_MODE=token and a token file that file_mounts delivers."""
    mounted = {remote.replace("$HOME/", "~/") for remote in cfg["file_mounts"]}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in ray_start_commands(cfg, key):
            if "RAY_AUTH_MODE=token" not in command:
                raise ValueError(f"{key}: `ray start` without RAY_AUTH_MODE=token")
            path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", command)
            if not path:
                raise ValueError(f"{key}: `ray start` without RAY_AUTH_TOKEN_PATH")
            if path.group(1).replace("$HOME/", "~/") not in mounted:
                raise ValueError(f"{key}: token file {path.group(1)} is not a file_mounts target, so no node has it")


def check_dashboard_local(cfg: dict) -> None:
    for command in ray_start_commands(cfg, "head_start_ray_commands"):
        host = re.search(r"--dashboard-host[= ](\S+)", command)
        if not host or host.group(1) != "127.0.0.1":
            raise ValueError("head `ray start` must pass --dashboard-host=127.0.0.1 (reach it by `ray dashboard`)")


def test_aws_recipe_passes_rays_schema_and_config_checks():
    cfg = aws_config()
    jsonschema.validate(cfg, ray_schema())
    # What `ray up` does before it touches AWS: merge the provider defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_aws_recipe_semantics():
    cfg = aws_config()
    check_node_types(cfg)
    check_token_auth(cfg)
    check_dashboard_local(cfg)


_DELETE = object()  # as a value for _mutate: remove the key


def _mutate(cfg, path, value):
    *parents, last = path
    target = cfg
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return cfg


@pytest.mark.parametrize("path, value, check, message", [
    (["head_node_type"], "head.default", check_node_types, "not one of available_node_types"),
    (["available_node_types", "gpu_worker", "min_workers"], 3, check_node_types, "min_workers 3 > max_workers 2"),
    (["available_node_types", "gpu_worker", "resources"], {"CPU": 48}, check_node_types, "GPU > 0"),
    (["available_node_types", "gpu_worker", "node_config", "InstanceType"], "m6i.12xlarge",
     check_node_types, "GPU"),
    (["available_node_types", "head", "node_config", "IamInstanceProfile"], _DELETE,
     check_node_types, "IamInstanceProfile"),
    (["worker_start_ray_commands"], ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"],
     check_token_auth, "RAY_AUTH_MODE=token"),
    (["file_mounts", "~/.ray/auth_token"], _DELETE, check_token_auth, "not a file_mounts target"),
    (["head_start_ray_commands"], ["RAY_AUTH_MODE=token ray start --head --dashboard-host=0.0.0.0"],
     check_dashboard_local, "127.0.0.1"),
])
def test_aws_checks_reject_broken_copies(path, value, check, message):
    cfg = _mutate(aws_config(), path, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        check(cfg)


def test_rays_schema_rejects_a_misspelled_key():
    cfg = aws_config()
    cfg["setup_command"] = cfg.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        jsonschema.validate(cfg, ray_schema())


def test_aws_node_environment_sources_in_bash(tmp_path):
    """The env file the setup writes, sourced the way the start commands do, gives t5adapt its settings."""
    cfg = aws_config()
    (write_env,) = [c for c in cfg["setup_commands"] if "> ~/t5adapt.env" in c]
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    subprocess.run(["bash", "-c", f"({write_env})"], check=True, env=env)
    shown = subprocess.run(["bash", "-c", "set -a && . ~/t5adapt.env && set +a && env"], check=True, env=env,
                           capture_output=True, text=True).stdout
    values = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert values["T5ADAPT_ROOT"] == f"{tmp_path}/t5adapt-runs"
    assert values["PATH"].startswith(f"{tmp_path}/t5adapt-venv/bin:")
    assert urlsplit(values["MLFLOW_TRACKING_URI"]).scheme in ("http", "https")
    assert re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", values["AWS_DEFAULT_REGION"])


def test_aws_mounts_hold_what_pip_install_needs():
    cfg = aws_config()
    local = {os.path.normpath(src) for dst, src in cfg["file_mounts"].items() if dst.startswith("~/t5adapt/")}
    assert local >= project_parts(), f"file_mounts lack {sorted(project_parts() - local)}"
    for src in local:
        assert os.path.exists(os.path.join(REPO, src)), src
    check_install_order(cfg["setup_commands"])


@pytest.mark.parametrize("broken, message", [
    (["pip install torch==2.13.0", "pip install deepspeed", "pip install ."], "--no-build-isolation"),
    (["pip install --no-build-isolation deepspeed", "pip install torch==2.13.0", "pip install ."], "torch, then"),
    (["pip install torch==2.13.0", "pip install --no-build-isolation deepspeed"], "no install command"),
])
def test_install_order_check_rejects(broken, message):
    with pytest.raises(ValueError, match=message):
        check_install_order(broken)


# -- cluster/kuberay/: RayCluster, RayJob and the credentials they name ----------------------------

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_CHARS = {"RayCluster": 53, "RayJob": 47}  # KubeRay's MaxRayClusterNameLength, MaxRayJobNameLength


def check_name(kind: str, name: str) -> None:
    if not DNS_1035.match(name):
        raise ValueError(f"{kind} name {name!r} is not a DNS-1035 label (lower case, digits, '-')")
    if len(name) > MAX_NAME_CHARS[kind]:
        raise ValueError(f"{kind} name {name!r} has {len(name)} characters, more than {MAX_NAME_CHARS[kind]}")


def check_cluster_spec(spec: dict) -> None:
    if not spec.get("headGroupSpec", {}).get("template", {}).get("spec", {}).get("containers"):
        raise ValueError("headGroupSpec.template needs a container")
    for index, group in enumerate(spec.get("workerGroupSpecs", [])):
        for field in ("groupName", "minReplicas", "maxReplicas", "template"):
            if field not in group:
                raise ValueError(f"workerGroupSpecs[{index}] has no {field}")
        if not 0 <= group["minReplicas"] <= group["maxReplicas"]:
            raise ValueError(f"worker group {group['groupName']}: minReplicas {group['minReplicas']} "
                             f"> maxReplicas {group['maxReplicas']} (or negative)")
    auth = spec.get("authOptions")
    if not auth or auth.get("mode") != "token":
        raise ValueError("authOptions.mode must be token (an unauthenticated cluster runs anyone's code)")
    if version_tuple(str(spec.get("rayVersion", "0"))) < (2, 52, 0):
        raise ValueError(f"authOptions.mode token needs rayVersion >= 2.52.0, got {spec.get('rayVersion')!r}")


def check_rayjob(spec: dict) -> None:
    given = [key for key in ("rayClusterSpec", "clusterSelector") if spec.get(key)]
    if len(given) != 1:
        raise ValueError(f"a RayJob needs exactly one of rayClusterSpec / clusterSelector, got {given or 'neither'}")
    # KubeRay puts the entrypoint into the submitter's shell line: an operator there would run
    # in the submitter pod, not in the job.
    if re.search(r"&&|\|\||[;|<>`]|\$\(", spec["entrypoint"]):
        raise ValueError(f"entrypoint must be one plain command, got {spec['entrypoint']!r}")


def gpu_groups(spec: dict) -> list:
    return [group["groupName"] for group in spec.get("workerGroupSpecs", [])
            if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) > 0
                   for c in group["template"]["spec"]["containers"])]


def check_gpu_group(spec: dict) -> None:
    if not gpu_groups(spec):
        raise ValueError("no worker group's container limits nvidia.com/gpu")


def by_kind(docs: list, kind: str) -> dict:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def secret_keys(secret: dict) -> set:
    return set(secret.get("data", {})) | set(secret.get("stringData", {}))


def check_token_secret(spec: dict, credentials: list) -> None:
    name = spec["authOptions"].get("secretName")
    secrets = by_kind(credentials, "Secret")
    if name not in secrets:
        raise ValueError(f"authOptions.secretName {name!r} is not a Secret in secrets.example.yaml")
    if "auth_token" not in secret_keys(secrets[name]):
        raise ValueError(f"Secret {name} has no key auth_token, which KubeRay reads")


CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|USERNAME")


def pod_templates(spec: dict) -> list:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def check_credentials(spec: dict, credentials: list) -> None:
    """MLflow's login from secretKeyRef, no credential as a literal value, S3 through IRSA (a
    ServiceAccount with a role) or AWS keys from secretKeyRef."""
    secrets = by_kind(credentials, "Secret")
    accounts = by_kind(credentials, "ServiceAccount")
    for template in pod_templates(spec):
        account = accounts.get(template["spec"].get("serviceAccountName"), {})
        irsa = "eks.amazonaws.com/role-arn" in account.get("metadata", {}).get("annotations", {})
        for container in template["spec"]["containers"]:
            env = {item["name"]: item for item in container.get("env", [])}
            keys = all("secretKeyRef" in env.get(key, {}).get("valueFrom", {})
                       for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
            if not (irsa or keys):
                raise ValueError(f"container {container['name']} has no S3 credentials: run it as a ServiceAccount "
                                 "with an IRSA role (secrets.example.yaml) or give AWS keys through secretKeyRef")
            if not env.get("MLFLOW_TRACKING_URI", {}).get("value"):
                raise ValueError(f"container {container['name']} has no MLFLOW_TRACKING_URI")
            for name, item in env.items():
                if CREDENTIAL_NAME.search(name) and "value" in item:
                    raise ValueError(f"container {container['name']}: {name} is a literal; use valueFrom.secretKeyRef")
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef", {})
                if ref.get("name") not in secrets or ref.get("key") not in secret_keys(secrets[ref["name"]]):
                    raise ValueError(f"container {container['name']}: {name} must come from a key of a Secret "
                                     "in secrets.example.yaml")


def check_placeholders(credentials: list) -> None:
    for secret in by_kind(credentials, "Secret").values():
        for key, value in {**secret.get("stringData", {}), **secret.get("data", {})}.items():
            if not str(value).startswith("REPLACE_"):
                raise ValueError(f"Secret {secret['metadata']['name']} key {key} holds a value, "
                                 "not a REPLACE_ placeholder")


def kuberay_manifests() -> tuple:
    (cluster,) = load_docs("kuberay", "raycluster.yaml")
    (job,) = load_docs("kuberay", "rayjob.yaml")
    return cluster, job, load_docs("kuberay", "secrets.example.yaml")


def test_kuberay_manifests_meet_kuberays_rules():
    cluster, job, credentials = kuberay_manifests()
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    check_name("RayCluster", cluster["metadata"]["name"])
    check_name("RayJob", job["metadata"]["name"])
    check_rayjob(job["spec"])
    check_placeholders(credentials)
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        check_cluster_spec(spec)
        check_gpu_group(spec)
        check_token_secret(spec, credentials)
        check_credentials(spec, credentials)


def test_rayjob_runs_the_cluster_of_raycluster_yaml():
    """One cluster definition in two places: a difference is an edit made to only one of them."""
    cluster, job, _ = kuberay_manifests()
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]


def test_rayjob_entrypoint_is_a_valid_t5adapt_run():
    """The entrypoint's config exists in the image and its overrides load with the project's schema."""
    from orchestrator.config import load_config

    _, job, _ = kuberay_manifests()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["t5adapt", "run"]
    assert argv[2].startswith(IMAGE_PROJECT_DIR + "/")
    config = load_config(os.path.join(REPO, os.path.relpath(argv[2], IMAGE_PROJECT_DIR)), argv[3:])
    assert config.store.startswith("s3://") and config.train.use_gpu
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert config.train.num_workers <= group["maxReplicas"]
    cpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert config.train.cpus_per_worker <= cpus


def _copy_with(doc: dict, path: list, value) -> dict:
    return _mutate(copy.deepcopy(doc), path, value)


@pytest.mark.parametrize("kind, name, message", [
    ("RayCluster", "t" * 54, "54 characters, more than 53"),
    ("RayJob", "t" * 48, "48 characters, more than 47"),
    ("RayCluster", "T5adapt", "DNS-1035"),
    ("RayJob", "5adapt", "DNS-1035"),
    ("RayCluster", "t5adapt-", "DNS-1035"),
])
def test_name_check_rejects(kind, name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_name(kind, name)


def test_name_check_accepts_the_limits():
    check_name("RayCluster", "t" * 53)
    check_name("RayJob", "t" * 47)


@pytest.mark.parametrize("path, value, message", [
    (["headGroupSpec", "template"], _DELETE, "headGroupSpec.template"),
    (["workerGroupSpecs", 0, "groupName"], _DELETE, "has no groupName"),
    (["workerGroupSpecs", 0, "maxReplicas"], _DELETE, "has no maxReplicas"),
    (["workerGroupSpecs", 0, "template"], _DELETE, "has no template"),
    (["workerGroupSpecs", 0, "minReplicas"], 9, "minReplicas 9 > maxReplicas 8"),
    (["rayVersion"], "2.51.0", "rayVersion >= 2.52.0"),
    (["authOptions", "mode"], "disabled", "authOptions.mode must be token"),
])
def test_cluster_spec_check_rejects(path, value, message):
    cluster, _, _ = kuberay_manifests()
    with pytest.raises(ValueError, match=re.escape(message)):
        check_cluster_spec(_copy_with(cluster["spec"], path, value))


def test_rayjob_check_rejects_both_or_neither_cluster_source():
    _, job, _ = kuberay_manifests()
    both = _copy_with(job["spec"], ["clusterSelector"], {"ray.io/cluster": "t5adapt"})
    with pytest.raises(ValueError, match="exactly one of rayClusterSpec / clusterSelector"):
        check_rayjob(both)
    with pytest.raises(ValueError, match="got neither"):
        check_rayjob(_copy_with(job["spec"], ["rayClusterSpec"], _DELETE))
    selector_only = _copy_with(both, ["rayClusterSpec"], _DELETE)
    check_rayjob(selector_only)


def test_rayjob_check_rejects_shell_operators():
    _, job, _ = kuberay_manifests()
    with pytest.raises(ValueError, match="one plain command"):
        check_rayjob(_copy_with(job["spec"], ["entrypoint"], "cd /home/ray/t5adapt && t5adapt run configs/tiny.yaml"))


def test_gpu_group_check_rejects_cpu_only_workers():
    cluster, _, _ = kuberay_manifests()
    spec = copy.deepcopy(cluster["spec"])
    for container in spec["workerGroupSpecs"][0]["template"]["spec"]["containers"]:
        for limits in container["resources"].values():
            limits.pop("nvidia.com/gpu")
    with pytest.raises(ValueError, match="nvidia.com/gpu"):
        check_gpu_group(spec)


def test_token_secret_check_rejects_unknown_secret_and_missing_key():
    cluster, _, credentials = kuberay_manifests()
    with pytest.raises(ValueError, match="is not a Secret"):
        check_token_secret(_copy_with(cluster["spec"], ["authOptions", "secretName"], "ray-token"), credentials)
    renamed = copy.deepcopy(credentials)
    token = by_kind(renamed, "Secret")["t5adapt-ray-token"]
    token["stringData"] = {"token": token["stringData"].pop("auth_token")}
    with pytest.raises(ValueError, match="no key auth_token"):
        check_token_secret(cluster["spec"], renamed)


def test_credentials_check_rejects_literals():
    cluster, _, credentials = kuberay_manifests()
    spec = copy.deepcopy(cluster["spec"])
    env = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = env + [
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "REPLACE_ME"}]
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY is a literal"):
        check_credentials(spec, credentials)
    spec = copy.deepcopy(cluster["spec"])
    head_env = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    head_env[:] = [item for item in head_env if item["name"] != "MLFLOW_TRACKING_PASSWORD"]
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_PASSWORD must come from a key"):
        check_credentials(spec, credentials)
    default_account = _copy_with(cluster["spec"], ["headGroupSpec", "template", "spec", "serviceAccountName"],
                                 "default")
    with pytest.raises(ValueError, match="ray-head has no S3 credentials"):
        check_credentials(default_account, credentials)
    default_account["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] += [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": "t5adapt-aws", "key": key}}}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    check_credentials(default_account, credentials)  # keys from a Secret are the documented alternative
    filled = copy.deepcopy(credentials)
    by_kind(filled, "Secret")["t5adapt-mlflow"]["stringData"]["MLFLOW_TRACKING_PASSWORD"] = "hunter2hunter2"
    with pytest.raises(ValueError, match="not a REPLACE_ placeholder"):
        check_placeholders(filled)


# -- cluster/Dockerfile and the Ray version everywhere ---------------------------------------------

def project_parts() -> set:
    """What `pip install .` reads: pyproject.toml, its readme and the top-level packages it includes."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    packages = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    return {"pyproject.toml", project["project"]["readme"]} | packages


def dockerfile_instructions() -> list:
    text = read("Dockerfile").replace("\\\n", " ")
    return [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_image_installs_torch_then_deepspeed_then_the_project():
    steps = dockerfile_instructions()
    check_install_order([args for op, args in steps if op == "RUN"])
    (workdir,) = [args.strip() for op, args in steps if op == "WORKDIR"]
    assert workdir == IMAGE_PROJECT_DIR, "the RayJob entrypoint's config path assumes this WORKDIR"
    copied = set()
    for op, args in steps:
        if op == "COPY":
            copied |= {os.path.normpath(src) for src in args.split()[:-1] if not src.startswith("--")}
    assert copied >= project_parts(), f"the image lacks {sorted(project_parts() - copied)}"
    assert all(os.path.exists(os.path.join(REPO, src)) for src in copied)


def test_one_ray_version_everywhere():
    """Image tag, pyproject pin, KubeRay rayVersion and the installed ray (what `ray up` runs) agree."""
    (base,) = [args for op, args in dockerfile_instructions() if op == "FROM"]
    image = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cu\d+)", base.strip())
    assert image, f"FROM {base!r} is not a Ray GPU image"
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    (pin,) = [re.search(r"==([\d.]+)", d).group(1) for d in dependencies if d.startswith("ray[")]
    cluster, job, _ = kuberay_manifests()
    versions = {image.group(1), pin, cluster["spec"]["rayVersion"], job["spec"]["rayClusterSpec"]["rayVersion"],
                importlib.metadata.version("ray")}
    assert len(versions) == 1, versions
    images = {c["image"] for spec in (cluster["spec"], job["spec"]["rayClusterSpec"])
              for t in pod_templates(spec) for c in t["spec"]["containers"]}
    assert len(images) == 1, f"head and workers must run one image, got {images}"


# -- cluster/mlflow/: the shared tracking server --------------------------------------------------

def server_options(command: list) -> dict:
    """`mlflow server` argv -> {flag: value, or True for a switch}."""
    if command[:2] != ["mlflow", "server"]:
        raise ValueError(f"the mlflow service must run `mlflow server`, got {command[:2]}")
    options, index = {}, 2
    while index < len(command):
        flag = command[index]
        takes_value = index + 1 < len(command) and not str(command[index + 1]).startswith("--")
        options[flag] = str(command[index + 1]) if takes_value else True
        index += 2 if takes_value else 1
    return options


def env_example() -> dict:
    lines = read("mlflow", ".env.example").splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def resolve(value: str) -> str:
    """Compose interpolation of ${VAR...} with the values of .env.example."""
    return re.sub(r"\$\{(\w+)[^}]*\}", lambda m: env_example()[m.group(1)], value)


def check_mlflow_server(compose: dict) -> None:
    options = server_options(compose["services"]["mlflow"]["command"])
    backend = urlsplit(options.get("--backend-store-uri", ""))
    if backend.scheme not in ("postgresql", "postgresql+psycopg2"):
        raise ValueError(f"--backend-store-uri must be PostgreSQL, got {options.get('--backend-store-uri')!r}")
    if backend.password:
        raise ValueError("--backend-store-uri holds a password: libpq reads PGPASSWORD instead")
    if backend.hostname not in compose["services"] or "postgres" not in compose["services"][backend.hostname]["image"]:
        raise ValueError(f"--backend-store-uri host {backend.hostname!r} is not the compose postgres service")
    if not resolve(str(options.get("--artifacts-destination", ""))).startswith("s3://"):
        raise ValueError("--artifacts-destination must be an s3:// prefix")
    if options.get("--serve-artifacts") is not True:
        raise ValueError("--serve-artifacts is missing: clients would need S3 credentials of their own")
    if options.get("--app-name") != "basic-auth":
        raise ValueError("--app-name basic-auth is missing: the server would accept anyone")
    for flag in ("--allowed-hosts", "--cors-allowed-origins"):
        value = resolve(str(options.get(flag, "")))
        if not value or "*" in value.split(","):
            raise ValueError(f"{flag} must list the hosts or origins, not {value!r}")
    if "--disable-security-middleware" in options:
        raise ValueError("--disable-security-middleware turns the host and origin checks off")


def check_compose_secrets(compose: dict) -> None:
    """Credentials reach containers only as secret files (or variables read from them)."""
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if CREDENTIAL_NAME.search(key) and not (key.endswith("_FILE") and str(value).startswith("/run/secrets/")):
                raise ValueError(f"service {name}: {key} is a literal; give it as a secret file")
    for name, secret in compose.get("secrets", {}).items():
        if not secret.get("file", "").startswith("./secrets/"):
            raise ValueError(f"secret {name} must be a file under ./secrets/ (git-ignored)")


def compose_file() -> dict:
    return yaml.safe_load(read("mlflow", "docker-compose.yaml"))


def test_mlflow_server_recipe():
    compose = compose_file()
    check_mlflow_server(compose)
    check_compose_secrets(compose)
    with open(os.path.join(MLFLOW, ".gitignore")) as f:
        assert {"secrets/", ".env"} <= set(f.read().split())
    mlflow_service = compose["services"]["mlflow"]
    mounted = {volume.split(":")[1] for volume in mlflow_service["volumes"]}
    assert mlflow_service["environment"]["MLFLOW_AUTH_CONFIG_PATH"] in mounted
    assert set(mlflow_service["secrets"]) == set(compose["secrets"])


def test_every_compose_variable_is_in_env_example():
    used = set(re.findall(r"\$\{(\w+)", json.dumps(compose_file())))  # values only, not comments
    assert used and used <= set(env_example()), f"missing from .env.example: {sorted(used - set(env_example()))}"
    for key in env_example():
        assert not CREDENTIAL_NAME.search(key), f".env.example must hold no credential, has {key}"


def test_auth_config_leaves_no_default_admin_password():
    """basic_auth.ini as MLflow reads it (configparser, [mlflow]): no admin_password, a password-free
    PostgreSQL URI; the password comes from MLFLOW_AUTH_ADMIN_PASSWORD, set by with-secrets.sh."""
    parser = configparser.ConfigParser()
    parser.read_string(read("mlflow", "basic_auth.ini"))
    auth = parser["mlflow"]
    assert not auth.get("admin_password")
    assert auth["admin_username"]
    uri = urlsplit(auth["database_uri"])
    assert uri.scheme == "postgresql" and uri.password is None and uri.hostname == "postgres"
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in read("mlflow", "with-secrets.sh")


def mlflow_declares(flag: str) -> bool:
    """Whether the installed MLflow's CLI declares `flag`, read from its source (importing the CLI
    takes seconds): a click option string, "--flag" or a switch pair such as "--flag/--no-flag"."""
    mlflow_dir = importlib.util.find_spec("mlflow").submodule_search_locations[0]
    source = ""
    for part in (("cli", "__init__.py"), ("utils", "cli_args.py")):
        with open(os.path.join(mlflow_dir, *part)) as f:
            source += f.read()
    return bool(re.search(rf'"(?:[^"\s]*/)?{re.escape(flag)}(?:/[^"\s]*)?"', source))


def test_installed_mlflow_has_the_server_flags():
    for flag in server_options(compose_file()["services"]["mlflow"]["command"]):
        assert mlflow_declares(flag), f"mlflow {importlib.metadata.version('mlflow')} has no `server {flag}`"
    assert not mlflow_declares("--allowed-host") and not mlflow_declares("--serve-artifact")
    (pin,) = re.findall(r"mlflow\[auth\]==([\d.]+)", read("mlflow", "Dockerfile"))
    assert version_tuple(pin) >= (3, 5, 0), "--allowed-hosts and --cors-allowed-origins need MLflow 3.5"


@pytest.mark.parametrize("option, value, message", [
    ("--backend-store-uri", "sqlite:///mlflow.db", "must be PostgreSQL"),
    ("--backend-store-uri", "postgresql://mlflow:hunter2@postgres:5432/mlflow", "holds a password"),
    ("--app-name", None, "basic-auth is missing"),
    ("--serve-artifacts", None, "--serve-artifacts is missing"),
    ("--allowed-hosts", "*", "--allowed-hosts must list"),
    ("--cors-allowed-origins", None, "--cors-allowed-origins must list"),
    ("--artifacts-destination", "./mlartifacts", "s3://"),
])
def test_mlflow_server_check_rejects(option, value, message):
    compose = compose_file()
    command = compose["services"]["mlflow"]["command"]
    at = command.index(option)
    takes_value = not str(command[at + 1]).startswith("--") if at + 1 < len(command) else False
    if value is None:
        del command[at:at + 1 + takes_value]
    else:
        command[at + 1] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        check_mlflow_server(compose)


def test_compose_secrets_check_rejects_literals():
    compose = compose_file()
    compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] = "example"
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD is a literal"):
        check_compose_secrets(compose)
    compose = compose_file()
    compose["secrets"]["postgres_password"] = {"file": "/home/me/pw"}
    with pytest.raises(ValueError, match="under ./secrets/"):
        check_compose_secrets(compose)


def test_with_secrets_exports_the_files(tmp_path):
    names = {"postgres_password": "PGPASSWORD", "mlflow_admin_password": "MLFLOW_AUTH_ADMIN_PASSWORD",
             "mlflow_flask_secret_key": "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    for index, name in enumerate(names):
        (tmp_path / name).write_text(f"value-{index}\n")
    script = os.path.join(MLFLOW, "with-secrets.sh")
    env = {"SECRETS_DIR": str(tmp_path), "PATH": os.environ["PATH"]}
    shown = subprocess.run(["sh", script, "env"], env=env, check=True, capture_output=True, text=True).stdout
    values = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert [values[var] for var in names.values()] == ["value-0", "value-1", "value-2"]
    (tmp_path / "mlflow_admin_password").write_text("")
    failed = subprocess.run(["sh", script, "env"], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "mlflow_admin_password is missing or empty" in failed.stderr
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" not in failed.stdout
