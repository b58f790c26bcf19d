"""The admin API of a model repository (`kiln serve --repository DIR --admin-key KEY`).

Routes, each behind `Authorization: Bearer <admin key>` (never the API keys, and no route without a key):
- GET  /admin/versions                 the model's versions on disk and loaded, the rollout's state and history
- POST /admin/versions/{n}/load        roll out version n (409 while another rollout runs)
- POST /admin/promote                  promote the canary now, skipping the steps left
- POST /admin/rollback                 roll the canary back now
- POST /admin/versions/{n}/unload      the canary: roll it back; the stable version: 409 (load another)
Errors are OpenAI error JSON like every other route's.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request

from kiln.serve.errors import APIError, AuthenticationError, NotFoundError
from kiln.serve.rollout import Rollout, RolloutBusyError
from kiln.serve.state import server_state


class ConflictError(APIError):
    status_code = 409
    error_type = "conflict_error"


def _rollout(request: Request) -> Rollout:
    return request.app.state.kiln_rollout


async def require_admin_key(request: Request) -> None:
    key = server_state(request).settings.admin_key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("missing admin key: send `Authorization: Bearer <admin key>`")
    if key is None or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise AuthenticationError("incorrect admin key")


async def list_versions(request: Request) -> dict[str, Any]:
    rollout = _rollout(request)
    router = rollout.router
    loaded = {v.number: v for v in router.live}
    versions = []
    for entry in rollout.repository.scan():
        version = loaded.get(entry.number) if entry.number is not None else None
        versions.append(
            {
                "version": entry.number,
                "name": entry.name,
                "valid": entry.valid,
                "problem": entry.problem,
                "role": version.role if version is not None else None,
                "in_flight": version.in_flight if version is not None else 0,
                "finished": version.finished if version is not None else 0,
                "failed": version.failed if version is not None else 0,
                "rejected": entry.number in rollout.rejected,
            }
        )
    return {
        "model": rollout.repository.model,
        "stable": router.stable.number,
        "canary": router.canary.number if router.canary is not None else None,
        "canary_share": router.canary_share,
        "state": rollout.state,
        "step": None if rollout.step is None else rollout.step + 1,
        "steps": list(rollout.plan.steps),
        "versions": versions,
        "history": [
            {"at": t.at, "version": t.version, "state": t.state, "detail": t.detail} for t in rollout.history
        ],
    }


async def load_version(version: int, request: Request) -> dict[str, Any]:
    rollout = _rollout(request)
    try:
        rollout.load(version)
    except KeyError:
        raise NotFoundError(
            f"{rollout.repository.model_dir} has no version {version}", code="version_not_found"
        ) from None
    except RolloutBusyError as exc:
        raise ConflictError(str(exc), code="rollout_in_progress") from None
    except ValueError as exc:
        raise ConflictError(str(exc), code="version_not_loadable") from None
    return {"version": version, "state": "loading"}


def _canary_action(request: Request, action: str) -> dict[str, Any]:
    rollout = _rollout(request)
    if not rollout.busy:
        raise ConflictError(
            f"no rollout is running: nothing to {action.replace('rollback', 'roll back')}", code="no_rollout"
        )
    rollout.request(action, "admin", f"the admin API asked to {action.replace('rollback', 'roll back')}")
    return {"version": rollout.rolling_out, "requested": action}


async def promote(request: Request) -> dict[str, Any]:
    return _canary_action(request, "promote")


async def rollback(request: Request) -> dict[str, Any]:
    return _canary_action(request, "rollback")


async def unload_version(version: int, request: Request) -> dict[str, Any]:
    rollout = _rollout(request)
    if version == rollout.router.stable.number:
        raise ConflictError(
            f"version {version} is the stable version; roll out another before unloading it",
            code="version_serving",
        )
    if rollout.busy and rollout.rolling_out == version:
        return _canary_action(request, "rollback")
    if any(v.number == version for v in rollout.router.retiring):
        raise ConflictError(
            f"version {version} is already unloading once its requests finish", code="version_retiring"
        )
    raise NotFoundError(f"version {version} is not loaded", code="version_not_loaded")


def add_admin_routes(app: FastAPI, rollout: Rollout) -> None:
    app.state.kiln_rollout = rollout
    admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)], include_in_schema=False)
    admin.add_api_route("/versions", list_versions, methods=["GET"])
    admin.add_api_route("/versions/{version}/load", load_version, methods=["POST"])
    admin.add_api_route("/versions/{version}/unload", unload_version, methods=["POST"])
    admin.add_api_route("/promote", promote, methods=["POST"])
    admin.add_api_route("/rollback", rollback, methods=["POST"])
    app.include_router(admin)
