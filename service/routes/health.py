"""Liveness, readiness and the running model's manifest."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sceneprint.service.deps import CLASSIFY, ScenesDep
from sceneprint.service.errors import PROBLEM_JSON
from sceneprint.service.keys import KeyRing
from sceneprint.service.routes.responses import PROBLEM_REF, problems
from sceneprint.service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses=problems())
async def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {
    "description": "Still loading (a Readiness document), or too many open connections (a problem document)",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}},
                PROBLEM_JSON: {"schema": PROBLEM_REF}}}})
async def readyz(request: Request) -> Any:
    """The model, the index and the API keys are loaded; says whether the service runs open (no key exists), and
    whether storage takes writes (``storage``: a disk that refuses them leaves the service ready for reads)."""
    scenes = getattr(request.app.state, "scenes", None)
    keys: KeyRing | None = getattr(request.app.state, "keys", None)
    if scenes is None or keys is None:
        return JSONResponse(status_code=503, content=Readiness(status="loading").model_dump())
    active = scenes.active  # one reference: model, index and threshold of one moment
    return Readiness(status="ready", access="open" if keys.open else "keys", model_version=active.model.version,
                     model_key=active.model.key, scenes_indexed=len(active.index),
                     unknown_threshold=active.decisions.unknown_threshold,
                     storage="ok" if scenes.storage_error is None else "unavailable",
                     storage_detail=scenes.storage_error)


@router.get("/model", dependencies=[CLASSIFY], responses=problems(401, 403))
async def model(scenes: ScenesDep) -> dict[str, Any]:
    """The running encoder bundle's manifest."""
    return scenes.model.manifest.to_json()
