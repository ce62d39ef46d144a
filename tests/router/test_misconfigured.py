"""A router started by hand with a worker in the wrong list says so: a prefill worker given as a decode worker
answers its health check but not the decode worker's API. The router keeps it out of routing, and its 503s,
/ready, /admin/status and ``splitserve status`` say why (not only "no healthy decode worker" or "retry shortly")."""

from __future__ import annotations

import httpx
import openai
import pytest

from cluster.admin_client import format_status
from tests.router.conftest import SERVED_MODEL, wait_for

HINT = "a prefill worker given as a decode worker (--decode)?"


def test_a_prefill_worker_given_as_a_decode_worker_is_named_so(make_router, cluster):
    wrong, right = cluster.prefills
    router = make_router([right], [wrong], ready=False)  # the model card comes from the prefill worker
    wait_for(
        lambda: router.call(lambda: router.router.pool.workers[wrong.address].down_reason),
        10,
        "the router's first health check of the worker",
    )

    with pytest.raises(openai.APIStatusError) as refused:
        router.openai().completions.create(model=SERVED_MODEL, prompt=[[5, 6, 7]], max_tokens=2)
    assert refused.value.status_code == 503
    message = refused.value.body["message"]
    assert message.startswith("no decode worker is ready (decode worker "), message  # the model is known
    assert f"decode worker {wrong.address}: " in message and HINT in message, message

    ready = httpx.get(f"{router.http}/ready", timeout=10)
    assert ready.status_code == 503
    [why] = ready.json()["unavailable_workers"]
    assert why.startswith(f"decode worker {wrong.address}: ") and why.endswith(HINT), why
    status = httpx.get(f"{router.http}/admin/status", timeout=10).json()
    assert f"  decode {wrong.address}: it answers but" in format_status(status)  # what `splitserve status` prints
    seen = {w["address"]: w for w in status["router_view"]}
    assert seen[wrong.address]["healthy"] is False and seen[wrong.address]["down_reason"].endswith(HINT), seen
    assert seen[right.address]["healthy"] is True and seen[right.address]["down_reason"] is None, seen


def test_with_every_worker_in_its_list_none_is_reported_unavailable(make_router, cluster):
    """The counterpart: every worker in its right list, nothing is reported unavailable."""
    router = make_router(cluster.prefills, [cluster.decode])
    assert httpx.get(f"{router.http}/ready", timeout=10).json()["unavailable_workers"] == []
    seen = httpx.get(f"{router.http}/admin/status", timeout=10).json()["router_view"]
    assert [w["down_reason"] for w in seen] == [None, None, None]
