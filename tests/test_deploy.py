"""deploy/ validates: generated files equal a fresh render, hadolint, yamllint, kubernetes-validate --strict on the
rendered manifests, the custom resources against the prometheus-operator CRD schemas kept in deploy/k8s/crds/,
and the ConfigMap holds only settings that differ from their defaults.

A validator missing on a developer's machine skips its test with the reason; under CI=true it fails instead
(.ci/run installs prometheus; the Python tools come with the dev extra). kustomize (``kubectl kustomize`` or
``kustomize``) is used when present, else the plain manifests of the base are validated (set
HYTREC_TEST_NO_KUSTOMIZE=1 to test that path where kustomize is installed).
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hytrec import ops

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy/k8s"
CRDS = K8S / "crds"


def require_tool(name: str) -> str:
    """The executable's path (PATH, then beside this Python); skip without it, or fail under CI=true."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    reason = f"{name} is not installed (Debian: apt-get install prometheus; Python tools: pip install -e '.[dev]')"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true needs every validator: {reason}")
    pytest.skip(reason)


def require_module(name: str) -> Any:
    """The imported module; skip without it, or fail under CI=true (it comes with the dev extra)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs {name} (pip install -e '.[dev]')")
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------ generated files
def test_generated_files_match_a_fresh_render() -> None:
    require_module("grafana_foundation_sdk")
    assert ops.update(check=True) == [], "deploy/ drifted from hytrec/ops.py: run `hytrec ops render`"


def test_render_writes_what_check_reports(tmp_path: Path) -> None:
    require_module("grafana_foundation_sdk")
    assert sorted(ops.update(root=tmp_path)) == sorted(ops.render_all())
    assert ops.update(check=True, root=tmp_path) == []
    assert ops.update(check=True, slo_p99_ms=75, root=tmp_path) == [ops.RULES, ops.PROMETHEUS_RULE]


def test_the_dashboard_filters_every_query_by_job_and_instance() -> None:
    require_module("grafana_foundation_sdk")
    from tests.test_prometheus import dashboard_queries

    board = ops.dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= set(variables)
    assert variables["job"]["includeAll"] and variables["job"]["allValue"] == ".*"
    assert "$job" in variables["instance"]["query"]
    queries = dashboard_queries(board)
    for expr in queries:
        names = re.findall(r"(?<![\w:])(hytrec_[\w]+|job[a-z_]*:[\w:]+)(\{[^}]*\})?", expr)
        assert names, expr
        for name, matchers in names:
            assert 'job=~"$job"' in matchers, f"{name} in {expr}"
            if name.startswith("hytrec_"):
                assert 'instance=~"$instance"' in matchers, f"{name} in {expr}"
    titles = {p.get("title") for p in board["panels"]}
    assert {"Model version", "Consumer lag by partition", "Dead letters"} <= titles


def test_every_alert_has_a_runbook() -> None:
    runbooks = (REPO / "docs/operations.md").read_text()
    for alert in ops.alerts(ops.default_slo_p99_ms()):
        assert f"### {alert.name}" in runbooks, f"no runbook paragraph for {alert.name} in docs/operations.md"


# ---------------------------------------------------------------------------------------- Dockerfile
def test_hadolint_has_no_warnings() -> None:
    hadolint = require_tool("hadolint")
    res = _run(hadolint, "--failure-threshold", "style", "Dockerfile")
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_dockerfile_installs_dependencies_before_the_code() -> None:
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines()]
    assert sum(ln.startswith("FROM ") for ln in lines) == 2, "multi-stage: a build and a runtime stage"
    deps = next(i for i, ln in enumerate(lines) if "-r /tmp/requirements.txt" in ln)
    first_code = next(i for i, ln in enumerate(lines) if ln.startswith("COPY service"))
    assert deps < first_code
    user = next(ln for ln in lines if ln.startswith("USER "))
    assert user.split()[1].replace(":", "").isdigit(), "a numeric user, so runAsNonRoot can check it"
    health = next(i for i, ln in enumerate(lines) if ln.startswith("HEALTHCHECK"))
    assert lines[health + 1].startswith('CMD ["'), "exec-form HEALTHCHECK"


def test_dockerignore_keeps_the_venv_out_of_the_context() -> None:
    rules = [ln for ln in (REPO / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert rules[0] == "*", "an allow-list: everything is ignored unless named"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert {"service", "state_store", "hytrec", "pyproject.toml", "requirements.lock"} <= allowed
    assert not {".venv", "var", "tests", "docs"} & allowed


def test_the_image_gets_every_package_folder() -> None:
    """`pip install .` in the image builds every package of pyproject's package-dir: each folder is in the context
    and copied (the stream consumer's folder was missing once)."""
    import tomllib

    folders = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    tops = {f.split("/")[0] for f in folders}
    rules = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {ln.split()[1] for ln in (REPO / "Dockerfile").read_text().splitlines() if ln.startswith("COPY ")}
    for top in tops:
        assert top in allowed or any(a.startswith(top + "/") for a in allowed), f"{top} not in .dockerignore's list"
    for folder in folders:
        assert any(folder == c or folder.startswith(c + "/") for c in copied), f"{folder} is not copied"


# ---------------------------------------------------------------------------------------------- YAML
def test_yamllint_passes() -> None:
    yamllint = require_tool("yamllint")
    res = _run(yamllint, "--strict", "-c", "deploy/.yamllint.yml", "deploy")
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_binds_loopback_and_runs_the_stack() -> None:
    compose = yaml.safe_load((REPO / "deploy/docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "hytrec", "consumer", "prometheus"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond the loopback interface"
    assert "--appendonly" in services["redis"]["command"]
    assert services["hytrec"]["deploy"]["replicas"] == 2
    assert ":?" in services["hytrec"]["environment"]["HYTREC_API_KEYS"], "compose refuses to start without keys"
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    consumer = services["consumer"]
    assert consumer["command"] == ["hytrec", "consume"] and consumer["read_only"] is True
    port = consumer["environment"]["HYTREC_CONSUME_METRICS_PORT"]
    scrape = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]
    jobs = {c["job_name"]: c["dns_sd_configs"][0] for c in scrape}
    assert jobs[ops.CONSUMER_JOB] == {**jobs[ops.CONSUMER_JOB], "names": ["consumer"], "port": int(port)}
    assert jobs[ops.JOB]["names"] == ["hytrec"]


# ---------------------------------------------------------------------------------------- Kubernetes
def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """name -> resources: the base and the production overlay rendered by kustomize, or the plain base files."""
    out = tmp_path_factory.mktemp("k8s")
    kustomize = None if os.environ.get("HYTREC_TEST_NO_KUSTOMIZE") else _kustomize()
    if kustomize is None:
        files = sorted(p for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")
        return {"base (plain files)": [d for p in files for d in yaml.safe_load_all(p.read_text()) if d]}
    tree = out / "k8s"
    shutil.copytree(K8S, tree)
    (tree / "overlays/production/api-keys.txt").write_text("key-one,key-two\n")  # what an operator writes
    rendered = {}
    for name, path in (("base", tree / "base"), ("production", tree / "overlays/production")):
        res = _run(*kustomize, str(path))
        assert res.returncode == 0, res.stderr
        rendered[name] = [d for d in yaml.safe_load_all(res.stdout) if d]
    return rendered


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_kubernetes_validate_strict(manifests: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    validate = require_tool("kubernetes-validate")
    for name, docs in manifests.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        res = _run(validate, "--strict", str(path))
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"
        for doc in docs:
            if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
                assert f"passed for resource {doc['kind'].lower()}/" in res.stdout + res.stderr


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused (the API server prunes them silently; a typo should fail)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        open_ended = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in schema and not open_ended:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_validator(kind: str) -> Any:
    jsonschema = require_module("jsonschema")
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            schema = _strict(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}
            return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"no CRD for {kind} in {CRDS}")


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PrometheusRule"])
def test_custom_resources_match_the_operator_crds(manifests: dict[str, list[dict[str, Any]]], kind: str) -> None:
    validator = _crd_validator(kind)
    docs = [d for resources in manifests.values() for d in _by_kind(resources, kind)]
    assert docs, f"no {kind} rendered"
    for doc in docs:
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, errors
    broken = copy.deepcopy(docs[0])
    broken["spec"]["intervall"] = "15s"  # a typo is refused, so the validation can fail
    assert list(validator.iter_errors(broken))


def test_configmap_holds_only_non_default_settings(manifests: dict[str, list[dict[str, Any]]]) -> None:
    from pydantic import TypeAdapter

    from hytrec.service.settings import Settings

    for docs in manifests.values():
        (config,) = _by_kind(docs, "ConfigMap")
        assert config["data"]
        for key, value in config["data"].items():
            assert key.startswith("HYTREC_")
            name = key.removeprefix("HYTREC_").lower()
            assert name in Settings.model_fields, f"{key} is not a setting"
            info = Settings.model_fields[name]
            default = info.default_factory() if info.default_factory else info.default
            assert TypeAdapter(info.annotation).validate_python(value) != default, f"{key}={value} is the default"


def test_the_workload_is_hardened_and_wired(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for docs in manifests.values():
        kinds = {d["kind"] for d in docs}
        expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
        assert expected | {"StatefulSet", "ConfigMap", "ServiceMonitor", "PrometheusRule"} <= kinds
        for workload in _by_kind(docs, "Deployment") + _by_kind(docs, "StatefulSet"):
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for c in pod["containers"]:
                assert not c["image"].endswith(":latest") and ":" in c["image"], c["image"]
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"]["drop"] == ["ALL"]
        (api,) = (d for d in _by_kind(docs, "Deployment") if d["metadata"]["name"] == "hytrec")
        pod = api["spec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], "the Prometheus multiprocess directory is writable"
        assert {"readinessProbe", "livenessProbe", "startupProbe", "resources"} <= set(pod["containers"][0])
        # the Redis URL names the Redis Service, the ServiceMonitor selects the API Service
        (config,) = _by_kind(docs, "ConfigMap")
        services = {s["metadata"]["name"]: s for s in _by_kind(docs, "Service")}
        host = config["data"]["HYTREC_REDIS_URL"].split("//")[1].split(":")[0]
        assert host in services
        (monitor,) = _by_kind(docs, "ServiceMonitor")
        wanted = monitor["spec"]["selector"]["matchLabels"]
        assert any(wanted.items() <= s["metadata"]["labels"].items() for s in services.values())
        assert ops.JOB in services, "the rules' job label is the Service name"
        # the consumer: its own metrics port, in a Service the ServiceMonitor selects, with an endpoint for it
        (consumer,) = (d for d in _by_kind(docs, "Deployment") if d["metadata"]["name"] == "hytrec-consumer")
        container = consumer["spec"]["template"]["spec"]["containers"][0]
        assert "consume" in container["command"] and {"startupProbe", "livenessProbe"} <= set(container)
        (metrics_port,) = container["ports"]
        consumer_svc = services[ops.CONSUMER_JOB]
        assert consumer_svc["spec"]["ports"][0]["name"] == metrics_port["name"]
        assert consumer_svc["spec"]["selector"].items() <= consumer["spec"]["template"]["metadata"]["labels"].items()
        assert wanted.items() <= consumer_svc["metadata"]["labels"].items()
        (expr,) = monitor["spec"]["selector"]["matchExpressions"]
        assert {"api", "consumer"} <= set(expr["values"]) and expr["operator"] == "In"
        ports = {e["port"] for e in monitor["spec"]["endpoints"]}
        assert {"http", metrics_port["name"]} <= ports
        # Redis admits the consumer
        (redis_policy,) = (d for d in _by_kind(docs, "NetworkPolicy") if d["metadata"]["name"] == "hytrec-redis")
        sources = [f["podSelector"]["matchLabels"] for r in redis_policy["spec"]["ingress"] for f in r["from"]]
        assert {"app.kubernetes.io/name": "hytrec", "app.kubernetes.io/component": "consumer"} in sources
