"""The chart's NetworkPolicies, read with Kubernetes' rules (networking.k8s.io/v1): a pod that no policy selects
takes ingress from anywhere; one that policies select takes only what one of their rules admits (a rule: from any
of its peers, to any of its ports; no `from` or no `ports`: any). Pods are the RayCluster's templates with the
labels KubeRay adds to the pods it makes (ray.io/cluster, ray.io/node-type, ray.io/group). Traffic from the pod's
own node (kubelet probes) is always allowed, whatever the policies say, and is not modelled here.

What must hold: the release's pods reach each other on every port (Ray's, the workers' gRPC, bulk KV, NIXL); a
neighbour (another release's pod, another namespace's) reaches only the router's HTTP and gRPC ports on the head;
networkPolicy.routerFrom narrows who reaches those; and the router's policy selects the pod the Service,
PodMonitor and scrape annotations send to, with the ports they use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.deploy.conftest import chart_objects, one

NAMESPACE = "serving"
WORKER_PORTS = (6379, 8265, 10001, 35123, 41877)  # Ray's GCS, dashboard, client; a worker's gRPC, a bulk KV port


@dataclass
class Pod:
    labels: dict
    namespace: str = NAMESPACE
    namespace_labels: dict = field(default_factory=dict)
    ports: dict = field(default_factory=dict)  # container port name -> number


def _modelled(obj: dict, keys: set[str], what: str) -> dict:
    """``obj``, refused if it has a key this reading of the rules does not model (it would be ignored, not read)."""
    unknown = sorted(set(obj) - keys)
    if unknown:
        raise AssertionError(f"{what} has {unknown}: this reading of the rules cannot judge a policy that uses them")
    return obj


def _selects(selector: dict, labels: dict) -> bool:
    _modelled(selector, {"matchLabels", "matchExpressions"}, "a label selector")
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {
            "In": present and labels[key] in values,
            "NotIn": not present or labels[key] not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def _peer_admits(peer: dict, source: Pod) -> bool:
    _modelled(peer, {"podSelector", "namespaceSelector"}, "a peer")  # sources here have no address for an ipBlock
    in_namespace = (
        _selects(peer["namespaceSelector"], source.namespace_labels)
        if "namespaceSelector" in peer
        else source.namespace == NAMESPACE
    )
    return in_namespace and _selects(peer.get("podSelector", {}), source.labels)


def _port_admits(entry: dict, port: int, target: Pod) -> bool:
    wanted = _modelled(entry, {"port", "protocol"}, "a port entry").get("port")
    return entry.get("protocol", "TCP") == "TCP" and (
        wanted is None or wanted == port or (isinstance(wanted, str) and target.ports.get(wanted) == port)
    )


def admits(policies: list[dict], source: Pod, target: Pod, port: int) -> bool:
    """Whether ``source`` may open a TCP connection to ``target``'s ``port`` under ``policies``."""
    for policy in policies:
        spec = _modelled(policy["spec"], {"podSelector", "policyTypes", "ingress"}, "a policy")
        assert spec.get("policyTypes", ["Ingress"]) == ["Ingress"], "only ingress is modelled"
        for rule in spec.get("ingress", []):
            _modelled(rule, {"from", "ports"}, "an ingress rule")
    selecting = [
        p for p in policies if target.namespace == NAMESPACE and _selects(p["spec"]["podSelector"], target.labels)
    ]
    if not selecting:
        return True
    return any(
        (not rule.get("from") or any(_peer_admits(peer, source) for peer in rule["from"]))
        and (not rule.get("ports") or any(_port_admits(entry, port, target) for entry in rule["ports"]))
        for policy in selecting
        for rule in policy["spec"].get("ingress", [])
    )


def pods(objects: list[dict]) -> dict[str, Pod]:
    """The RayCluster's pods as KubeRay makes them: head, prefill and decode."""
    raycluster = one(objects, "RayCluster")
    name = raycluster["metadata"]["name"]
    groups = {"head": ("head", raycluster["spec"]["headGroupSpec"])}
    groups.update({g["groupName"]: ("worker", g) for g in raycluster["spec"]["workerGroupSpecs"]})
    made = {}
    for group, (node_type, spec) in groups.items():
        labels = dict(spec["template"]["metadata"].get("labels", {}), **{"ray.io/cluster": name})
        labels["ray.io/node-type"] = node_type
        labels["ray.io/group"] = "headgroup" if node_type == "head" else group
        ports = {
            p["name"]: p["containerPort"] for c in spec["template"]["spec"]["containers"] for p in c.get("ports", [])
        }
        made[group] = Pod(labels, ports=ports)
    return made


def neighbours() -> dict[str, Pod]:
    return {
        "another release's pod": Pod({"app.kubernetes.io/name": "splitserve", "app.kubernetes.io/instance": "other"}),
        "an unlabelled pod": Pod({}),
        "a pod of another namespace": Pod({}, "web", {"kubernetes.io/metadata.name": "web"}),
    }


def policies_of(objects: list[dict]) -> list[dict]:
    """The release's policies: members and router, and metrics when networkPolicy.metricsFrom is set."""
    found = [o for o in objects if o["kind"] == "NetworkPolicy"]
    roles = [o["metadata"]["name"].rsplit("-", 1)[1] for o in found]
    assert roles in (["members", "router"], ["members", "router", "metrics"]), roles
    return found


def test_the_release_pods_reach_each_other_on_every_port(objects):
    policies, members = policies_of(objects), pods(objects)
    for source in members.values():
        for target_name, target in members.items():
            ports = (*WORKER_PORTS, *target.ports.values())
            refused = [port for port in ports if not admits(policies, source, target, port)]
            assert not refused, f"{source.labels['ray.io/group']} -> {target_name}: ports {refused} refused"


def test_a_neighbour_reaches_only_the_router_ports_on_the_head(objects):
    policies, members = policies_of(objects), pods(objects)
    head = members["head"]
    router_ports = {head.ports["http"], head.ports["grpc"]}
    for name, neighbour in neighbours().items():
        for target_name, target in members.items():
            for port in (*WORKER_PORTS, *target.ports.values()):
                expected = target is head and port in router_ports
                assert admits(policies, neighbour, target, port) == expected, f"{name} -> {target_name}:{port}"


INGRESS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
RAY_METRICS_PORT = 8080


def test_router_from_narrows_who_reaches_the_router():
    ingress = INGRESS
    objects = chart_objects(
        values={"networkPolicy": {"enabled": True, "routerFrom": [ingress]}, "metrics": {"podAnnotations": False}}
    )
    policies, members = policies_of(objects), pods(objects)
    head = members["head"]
    controller = Pod({"app": "ingress"}, "ingress-nginx", {"kubernetes.io/metadata.name": "ingress-nginx"})
    assert admits(policies, controller, head, head.ports["http"])
    assert admits(policies, controller, head, head.ports["grpc"])
    assert not admits(policies, controller, head, 6379)
    for name, neighbour in neighbours().items():
        assert not admits(policies, neighbour, head, head.ports["http"]), name
    assert admits(policies, members["decode"], head, head.ports["http"]), "a member lost the router"


def test_the_router_policy_opens_what_the_service_and_prometheus_use(objects):
    router = next(p for p in policies_of(objects) if p["metadata"]["name"].endswith("-router"))
    head = pods(objects)["head"]
    service = one(objects, "Service")
    assert router["spec"]["podSelector"]["matchLabels"] == service["spec"]["selector"]
    opened = {entry["port"] for rule in router["spec"]["ingress"] for entry in rule["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == opened
    assert opened <= set(head.ports), f"ports {opened - set(head.ports)} are not the head container's"
    for monitor in (o for o in objects if o["kind"] == "PodMonitor"):
        assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= opened
    annotations = one(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:
        assert int(annotations["prometheus.io/port"]) in {head.ports[name] for name in opened}


def test_without_network_policies_nothing_is_rendered():
    objects = chart_objects(values={"networkPolicy": {"enabled": False, "routerFrom": []}})
    assert not [o for o in objects if o["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize(
    "peer", [{}, {"ports": [80]}, {"podSelector": {"matchLabel": {"app": "x"}}}, {"ipBlock": {"except": []}}]
)
def test_router_from_takes_network_policy_peers_only(peer):
    from tests.deploy.conftest import HelmError

    with pytest.raises(HelmError, match="routerFrom"):
        chart_objects(values={"networkPolicy": {"enabled": True, "routerFrom": [peer]}})


# -- Prometheus through a narrowed policy (networkPolicy.metricsFrom) ------------------------------


@pytest.mark.parametrize(
    "metrics, named",
    [
        ({"podAnnotations": True}, "metrics.podAnnotations"),
        ({"podAnnotations": False, "podMonitor": {"enabled": True}}, "metrics.podMonitor.enabled"),
    ],
)
def test_a_narrowed_router_policy_with_a_scrape_needs_metrics_from(metrics, named):
    from tests.deploy.conftest import HelmError

    with pytest.raises(HelmError, match=f"networkPolicy.routerFrom .*{named} is true.*networkPolicy.metricsFrom"):
        chart_objects(values={"networkPolicy": {"enabled": True, "routerFrom": [INGRESS]}, "metrics": metrics})


@pytest.mark.parametrize("podmonitor", [False, True])
def test_metrics_from_lets_prometheus_scrape_the_router_and_ray(podmonitor):
    metrics = {"podAnnotations": not podmonitor, "podMonitor": {"enabled": podmonitor}}
    network = {"enabled": True, "routerFrom": [INGRESS], "metricsFrom": [MONITORING]}
    objects = chart_objects(values={"networkPolicy": network, "metrics": metrics})
    policies, members = policies_of(objects), pods(objects)
    assert len(policies) == 3
    head = members["head"]
    prometheus = Pod({"app": "prometheus"}, "monitoring", {"kubernetes.io/metadata.name": "monitoring"})
    scraped = {e["port"] for m in objects if m["kind"] == "PodMonitor" for e in m["spec"]["podMetricsEndpoints"]}
    annotations = one(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]["annotations"]
    if "prometheus.io/port" in annotations:
        scraped.add(int(annotations["prometheus.io/port"]))
    assert scraped, "no scrape configured"
    for port in scraped:
        assert admits(policies, prometheus, head, head.ports[port] if isinstance(port, str) else port)
    for name, target in members.items():
        assert admits(policies, prometheus, target, RAY_METRICS_PORT), f"Ray's metrics on {name}"
        assert not admits(policies, prometheus, target, 6379), name
    assert not admits(policies, prometheus, head, head.ports["grpc"])
    for name, neighbour in neighbours().items():
        assert not admits(policies, neighbour, head, head.ports["http"]), name
        assert not admits(policies, neighbour, members["decode"], RAY_METRICS_PORT), name
    ingress = Pod({"app": "ingress"}, "ingress-nginx", {"kubernetes.io/metadata.name": "ingress-nginx"})
    assert not admits(policies, ingress, members["decode"], RAY_METRICS_PORT)


def test_peers_without_network_policies_are_refused():
    from tests.deploy.conftest import HelmError

    for key in ("routerFrom", "metricsFrom"):
        with pytest.raises(HelmError, match=f"networkPolicy.{key} is set but networkPolicy.enabled is false"):
            chart_objects(values={"networkPolicy": {"enabled": False, key: [MONITORING]}})
