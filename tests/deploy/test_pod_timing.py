"""What Kubernetes allows the pods in time follows the values that set splitserve's own: every pod's
terminationGracePeriodSeconds outlasts the head's stop (router.shutdownDelaySeconds, router.settings.shutdown_grace_s,
the cut's unwinding, the workers' stop), and the head's startup probe allows its start startTimeoutSeconds. Each is
checked through what the chart renders (the ConfigMap's config as `splitserve up` reads it, the pods), for the
defaults and for values the chart used to accept and then let Kubernetes kill the head mid-drain."""

from __future__ import annotations

import math

import pytest

from router.server import CUT_UNWIND_S
from tests.deploy.conftest import GPU_VALUES, chart_objects, head_container, one, worker_group
from tests.deploy.test_placement import ROLES, configmap_config

WORKERS_STOP_S = 20  # what the head's `splitserve up` keeps for its workers' stop after the router's

# id -> (value files, --set-json values, more helm arguments)
STOPS = {
    "default": ((), None, ()),
    "gpu": ((GPU_VALUES,), None, ()),
    # The audit's repro (helm's --set hands both over as integers): the head used to keep 60 s, for 350 s of drain.
    "long-drain": (
        (),
        None,
        ("--set", "router.shutdownDelaySeconds=50", "--set", "router.settings.shutdown_grace_s=300"),
    ),
    # Fractions by --set arrive as strings.
    "fractions-set": (
        (),
        None,
        ("--set", "router.shutdownDelaySeconds=2.5", "--set", "router.settings.shutdown_grace_s=40.25"),
    ),
    "fractions-json": ((), {"router": {"shutdownDelaySeconds": 0.5, "settings": {"shutdown_grace_s": 90.5}}}, ()),
    "no-delay-no-grace": ((), {"router": {"shutdownDelaySeconds": 0, "settings": {"shutdown_grace_s": 0}}}, ()),
    "grace-only": ((), {"router": {"settings": {"shutdown_grace_s": 600}}}, ()),
    "delay-only": ((GPU_VALUES,), {"router": {"shutdownDelaySeconds": 45}}, ()),
}


@pytest.mark.parametrize("case", sorted(STOPS))
def test_every_pod_outlasts_the_heads_stop(case):
    """Kubernetes kills a pod when its termination grace ends. The head's must cover the router's delay, its grace
    for the requests in flight, the cut's unwinding and the workers' stop, or the streams are cut without their
    error event and the workers are never stopped. The worker pods ignore SIGTERM (bash is their PID 1) and serve
    the head's requests until it stops them: when every pod stops at once (helm uninstall, a Recreate upgrade),
    one killed earlier cuts the requests the head is still draining."""
    value_files, values, extra = STOPS[case]
    objects = chart_objects(value_files, values, extra=extra)
    router = configmap_config(objects).router  # the settings `splitserve up` reads, Python's defaults included
    raycluster = one(objects, "RayCluster")
    drain = router.shutdown_delay_s + router.shutdown_grace_s + 2 * CUT_UNWIND_S
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert isinstance(head, int) and head == math.ceil(drain + WORKERS_STOP_S), (
        f"{case}: delay {router.shutdown_delay_s} + grace {router.shutdown_grace_s} + unwinding {2 * CUT_UNWIND_S} "
        f"+ workers {WORKERS_STOP_S} s against the head's terminationGracePeriodSeconds {head}"
    )
    for role in ROLES:
        worker = worker_group(raycluster, role)["template"]["spec"].get("terminationGracePeriodSeconds")
        assert worker is not None and worker >= drain, (
            f"{case}: the {role} pods' terminationGracePeriodSeconds {worker} (none: Kubernetes' 30) ends before the "
            f"head's drain, {drain} s"
        )


@pytest.mark.parametrize("start_timeout", [None, 60, 901, 3600])
def test_the_heads_startup_probe_allows_start_timeout(start_timeout):
    """/health answers once the router serves, after Ray and the model's reading (a mounted checkpoint's weights are
    fingerprinted): the head gets as long for that as startTimeoutSeconds gives the workers, not a second number
    that restarts it first."""
    objects = chart_objects(values=None if start_timeout is None else {"startTimeoutSeconds": start_timeout})
    allowed = configmap_config(objects).start_timeout_s
    probe = head_container(one(objects, "RayCluster"))["startupProbe"]
    total = probe["periodSeconds"] * probe["failureThreshold"]
    assert allowed <= total < allowed + probe["periodSeconds"], (
        f"startupProbe allows {total} s (periodSeconds {probe['periodSeconds']} x failureThreshold "
        f"{probe['failureThreshold']}), start_timeout_s is {allowed} s"
    )
