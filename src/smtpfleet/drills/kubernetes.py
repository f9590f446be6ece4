"""The Kubernetes preset of a target file (`preset: kubernetes`): its keys, checked, and the
kubectl commands it fills `faults` with (docs/drills.md, "Kubernetes preset").

Plain strings in, plain strings out: the target file's reader (`target_file`) turns the pairs
into fault commands and reports the problems, naming the file.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

# Every key of `kubernetes:`, and its default. A misspelt key is refused rather than ignored:
# `namspace: mail` would otherwise drill the `default` namespace of whatever cluster kubectl
# points at.
TEXT_KEYS: dict[str, str | None] = {
    "namespace": "default",
    "context": None,  # kubectl's current context
    "selector": "app.kubernetes.io/name=smtpfleet",
    "relay_deployment": "smtpfleet-relay",
    "relay_selector": "app.kubernetes.io/name=smtpfleet-relay",
    "redis_pod": "redis-0",
    "redis_container": "redis",
    "sentinel_container": "sentinel",
    "master_name": "smtpfleet",
    "netadmin_image": "nicolaka/netshoot",
    "interface": "eth0",
}
# key -> (default, least, most)
NUMBER_KEYS: dict[str, tuple[int, int, int]] = {
    "relay_replicas": (1, 1, 10_000),  # what relay-down's heal scales back to
    "sentinel_port": (26379, 1, 65535),
}

Commands = tuple[str, str | None]  # (inject, heal)
Settings = dict[str, str | int | None]


def check_kubernetes(raw: object, problems: list[str]) -> Settings:
    """`kubernetes:` with its defaults filled in; each bad key appended to `problems`."""
    settings: Settings = dict(TEXT_KEYS)
    settings.update({key: bounds[0] for key, bounds in NUMBER_KEYS.items()})
    if raw is None:
        return settings
    if not isinstance(raw, Mapping):
        problems.append(f"kubernetes: expected a mapping (namespace, selector, ...), not {raw!r}")
        return settings
    for key, value in raw.items():
        if key in TEXT_KEYS:
            text = _text(value)
            if text is None:
                problems.append(f"kubernetes.{key}: expected a name, not {value!r}")
            settings[str(key)] = text
        elif key in NUMBER_KEYS:
            _, least, most = NUMBER_KEYS[key]
            # bool is an int to Python, and YAML reads `yes` as True.
            if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
                problems.append(
                    f"kubernetes.{key}: expected a whole number from {least} to {most}, "
                    f"not {value!r}"
                )
            else:
                settings[key] = value
        else:
            known = ", ".join([*TEXT_KEYS, *NUMBER_KEYS])
            problems.append(f"kubernetes.{key}: unknown key (known: {known})")
    return settings


def _text(value: object) -> str | None:
    """A name YAML may have read as a number (`namespace: 2024`); None for anything else."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def kubernetes_faults(k8s: Mapping[str, object]) -> dict[str, Commands]:
    """kubectl for each fault, for the chart's `smtpfleet` Deployment (docs/drills.md)."""
    kubectl = "kubectl --namespace " + _q(k8s, "namespace")
    if k8s.get("context"):
        kubectl += " --context " + _q(k8s, "context")
    first_pod = f"POD=$({kubectl} get pods -l {_q(k8s, 'selector')} -o name | head -n 1) && "
    relay = "deployment/" + _q(k8s, "relay_deployment")
    replicas = _number(k8s, "relay_replicas")
    redis = _q(k8s, "redis_pod")
    redis_cli = f"{kubectl} exec {redis} -c {_q(k8s, 'redis_container')} -- redis-cli"
    sentinel_cli = (
        f"{kubectl} exec {redis} -c {_q(k8s, 'sentinel_container')}"
        f" -- redis-cli -p {_number(k8s, 'sentinel_port')}"
    )
    return {
        **kubernetes_network_faults(k8s, kubectl, first_pod),
        "kill-node": (
            first_pod + f'{kubectl} delete "$POD" --grace-period=0 --force --wait=false',
            None,
        ),
        "drain-node": (first_pod + f'{kubectl} delete "$POD" --wait=false', None),
        "relay-down": (
            f"{kubectl} scale {relay} --replicas=0",
            f"{kubectl} scale {relay} --replicas={replicas}",
        ),
        "relay-slow": (
            f"{kubectl} exec {relay} -- tc qdisc add dev eth0 root netem delay 1500ms",
            f"{kubectl} exec {relay} -- tc qdisc del dev eth0 root",
        ),
        "redis-unavailable": (
            f"{redis_cli} CLIENT PAUSE {{fault_ms}} ALL",
            f"{redis_cli} CLIENT UNPAUSE",
        ),
        "redis-failover": (
            f"{sentinel_cli} SENTINEL FAILOVER {_q(k8s, 'master_name')}",
            None,
        ),
    }


def _q(k8s: Mapping[str, object], key: str) -> str:
    """The setting, quoted for `sh -c` (a default when the mapping lacks it)."""
    return shlex.quote(str(k8s.get(key) or TEXT_KEYS[key]))


def _number(k8s: Mapping[str, object], key: str) -> int:
    value = k8s.get(key)
    return value if isinstance(value, int) else NUMBER_KEYS[key][0]


# The preference of the drill's tc filters in a pod: one the drill alone uses, so the heal
# deletes its own filters and nothing else in the pod's network namespace.
DRILL_TC_PREF = 4915


def kubernetes_network_faults(
    k8s: Mapping[str, object], kubectl: str, first_pod: str
) -> dict[str, Commands]:
    """net-redis-cut, net-relay-cut and net-redis-slow as `tc` in the pod's own network
    namespace, run by an ephemeral debug container with NET_ADMIN (`kubectl debug
    --profile=netadmin`): the chart's pods drop every capability and carry no tc, and a
    NetworkPolicy cannot take away what the chart's own policy allows (policies only add)."""
    dev = _q(k8s, "interface")
    image = _q(k8s, "netadmin_image")
    debug = f"{kubectl} debug --profile=netadmin --image={image} --attach --quiet"
    redis = _q(k8s, "redis_pod")
    redis_ip = f"PEER=$({kubectl} get pod {redis} -o jsonpath='{{.status.podIP}}') && "
    relay_ip = (
        f"PEER=$({kubectl} get pods -l {_q(k8s, 'relay_selector')}"
        " -o jsonpath='{.items[0].status.podIP}') && "
    )
    cut, heal = _tc_cut(debug, dev), _tc_heal(debug, dev)
    slow = f"{debug} {redis} -- tc qdisc"
    return {
        "net-redis-cut": (first_pod + redis_ip + cut, first_pod + heal),
        "net-relay-cut": (first_pod + relay_ip + cut, first_pod + heal),
        "net-redis-slow": (
            f"{slow} add dev {dev} root netem delay 200ms",
            f"{slow} del dev {dev} root",
        ),
    }


def _tc_cut(debug: str, dev: str) -> str:
    """Drop what the pod ($POD) sends to and receives from $PEER, IPv4 or IPv6."""
    family = 'case "$PEER" in *:*) F="ipv6 u32 match ip6";; *) F="ip u32 match ip";; esac && '
    filters = " && ".join(
        f"tc filter add dev {dev} {hook} pref {DRILL_TC_PREF} protocol $F {way} $PEER action drop"
        for hook, way in (("egress", "dst"), ("ingress", "src"))
    )
    return (
        family + f'{debug} "$POD" -- sh -c "tc qdisc add dev {dev} clsact 2>/dev/null; {filters}"'
    )


def _tc_heal(debug: str, dev: str) -> str:
    deletes = "; ".join(
        f"tc filter del dev {dev} {hook} pref {DRILL_TC_PREF}" for hook in ("egress", "ingress")
    )
    return f'{debug} "$POD" -- sh -c "{deletes}"'
