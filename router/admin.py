"""Operator endpoints: cluster status (read) and actions (scale a pool, drain a worker).

Actions need the admin token (``Authorization: Bearer`` or ``X-Admin-Token``); without a configured
token they are refused. A router started without a control plane answers 501.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from router.control import ControlPlane
from router.frontend import Frontend
from router.openai_api import error_response


class ScaleBody(BaseModel):
    role: str
    replicas: int = Field(ge=0, le=1024)


class DrainBody(BaseModel):
    worker_id: str


def install_admin(app: FastAPI, frontend: Frontend, control: ControlPlane | None, admin_token: str | None) -> None:
    def refused(request: Request):
        if control is None:
            return error_response(
                "this router has no control plane (started with static workers)", 501, "not_implemented"
            )
        if not admin_token:
            return error_response("admin actions are disabled: no admin token is configured", 403, "admin_disabled")
        supplied = (
            request.headers.get("x-admin-token")
            or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        )
        if not hmac.compare_digest(supplied, admin_token):
            return error_response("missing or incorrect admin token", 403, "invalid_admin_token")
        return None

    @app.get("/admin/status")
    async def status() -> dict:
        routers = {"router": {"running": frontend.admission.running, "queued": frontend.admission.waiting}}
        known = [
            {
                "address": w.address,
                "role": w.role,
                "healthy": w.healthy,
                "draining": w.draining,
                "active": w.active,
                "incompatible": w.incompatible.reason if w.incompatible else None,
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

    @app.post("/admin/scale")
    async def scale(body: ScaleBody, request: Request):
        if (problem := refused(request)) is not None:
            return problem
        try:
            return await control.scale(body.role, body.replicas)
        except ValueError as exc:
            return error_response(str(exc), 400, "invalid_request_error")

    @app.post("/admin/drain")
    async def drain(body: DrainBody, request: Request):
        if (problem := refused(request)) is not None:
            return problem
        try:
            return await control.drain(body.worker_id)
        except ValueError as exc:
            return error_response(str(exc), 404, "not_found")
