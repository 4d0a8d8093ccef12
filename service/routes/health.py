"""Liveness, readiness and the running model's manifest."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sceneprint.service.deps import ScenesDep
from sceneprint.service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> Any:
    """The model and the index are loaded."""
    scenes = getattr(request.app.state, "scenes", None)
    if scenes is None:
        return JSONResponse(status_code=503, content=Readiness(status="loading").model_dump())
    return Readiness(status="ready", model_version=scenes.model.version, scenes_indexed=len(scenes.index),
                     unknown_threshold=scenes.unknown_threshold)


@router.get("/model")
async def model(scenes: ScenesDep) -> dict[str, Any]:
    """The running encoder bundle's manifest."""
    return scenes.model.manifest.to_json()
