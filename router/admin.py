"""Operator endpoints: cluster status (read) and actions (scale a pool, drain a worker).

Everything here, and the dashboard's data, needs the admin token (``X-Admin-Token`` or ``Authorization:
Bearer``): status shows worker addresses, nodes and load. Without a configured token, actions are refused
and reads are open only on a router that has no API keys either (an open router; nothing to guard with).
A router started without a control plane answers actions with 501.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import Headers

from router.control import ControlPlane, ControlPlaneUnavailable
from router.frontend import Frontend
from router.openai_api import error_response


class ScaleBody(BaseModel):
    role: str
    replicas: int = Field(ge=0, le=1024)


class DrainBody(BaseModel):
    worker_id: str


NO_ADMIN_TOKEN = (
    "no admin token is configured (SPLITSERVE_ADMIN_TOKEN, SPLITSERVE_ADMIN_TOKEN_FILE or --admin-token-file)"
)


def admin_refusal(headers: Headers, admin_token: str | None, api_keys: tuple[str, ...], action: bool):
    """None when the request may go on, else the error response (403) saying why."""
    if not admin_token:
        if action:
            return error_response(f"admin actions are disabled: {NO_ADMIN_TOKEN}", 403, "admin_disabled")
        if api_keys:
            return error_response(f"operator data is disabled: {NO_ADMIN_TOKEN}", 403, "admin_disabled")
        return None
    supplied = headers.get("x-admin-token") or headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(supplied.encode(), admin_token.encode()):
        return error_response("missing or incorrect admin token", 403, "invalid_admin_token")
    return None


class _Refused(Exception):
    """An action refused before its body is read (who may not act learns nothing of what a body should hold)."""

    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def install_admin(
    app: FastAPI,
    frontend: Frontend,
    control: ControlPlane | None,
    admin_token: str | None,
    api_keys: tuple[str, ...] = (),
) -> None:
    def action_allowed(request: Request) -> None:  # a dependency: FastAPI runs it before reading the body
        if control is None:
            raise _Refused(
                error_response("this router has no control plane (started with static workers)", 501, "not_implemented")
            )
        if (problem := admin_refusal(request.headers, admin_token, api_keys, action=True)) is not None:
            raise _Refused(problem)

    @app.exception_handler(_Refused)
    async def refusal(request: Request, exc: _Refused) -> JSONResponse:
        return exc.response

    @app.exception_handler(ControlPlaneUnavailable)  # whichever admin call asked it
    async def unavailable(request: Request, exc: ControlPlaneUnavailable) -> JSONResponse:
        return error_response(str(exc), 503, "control_plane_unavailable")

    @app.get("/admin/status")
    async def status(request: Request):
        if (problem := admin_refusal(request.headers, admin_token, api_keys, action=False)) is not None:
            return problem
        routers = {"router": {"running": frontend.admission.running, "queued": frontend.admission.waiting}}
        known = [
            {
                "address": w.address,
                "role": w.role,
                "healthy": w.healthy,
                "draining": w.draining,
                "active": w.active,
                "prefill_backlog_tokens": w.queued_prefill_tokens,
                "prefill_ms_per_token": None if w.prefill_s_per_token is None else w.prefill_s_per_token * 1000.0,
                "prefill_wait_ms": None if (wait := w.prefill_wait_s()) is None else wait * 1000.0,
                "incompatible": w.incompatible.reason if w.incompatible else None,
                "down_reason": w.down_reason,
            }
            for w in frontend.pool.workers.values()
        ]
        cluster = await control.status() if control is not None else None
        return {
            "cluster": cluster,
            "router": routers["router"],
            "model": frontend.model.describe(),
            "router_view": known,
        }

    @app.post("/admin/scale", dependencies=[Depends(action_allowed)])
    async def scale(body: ScaleBody):
        try:
            return await control.scale(body.role, body.replicas)
        except ValueError as exc:
            return error_response(str(exc), 400, "invalid_request_error")

    @app.post("/admin/drain", dependencies=[Depends(action_allowed)])
    async def drain(body: DrainBody):
        try:
            return await control.drain(body.worker_id)
        except ValueError as exc:
            return error_response(str(exc), 404, "not_found")
