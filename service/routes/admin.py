"""Model reloads (scope ``admin``): their progress, and a reload to the registry's current version on demand."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, status

from sceneprint.service.deps import ADMIN, ScenesDep
from sceneprint.service.errors import NoRegistry
from sceneprint.service.reload import Reloader
from sceneprint.service.routes.responses import problems
from sceneprint.service.schemas import ReloadPublic

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[ADMIN])


def _reloader(request: Request) -> Reloader | None:
    reloader: Reloader | None = getattr(request.app.state, "reloader", None)
    return reloader


@router.get("/reload", response_model=ReloadPublic, responses=problems(401, 403))
async def reload_status(request: Request, scenes: ScenesDep) -> ReloadPublic:
    """The last (or running) model reload's progress, and the model serving now."""
    reloader = _reloader(request)
    if reloader is None:
        model = scenes.model
        return ReloadPublic(state="idle", serving_version=model.version, serving_key=model.key,
                            serving_registry_version=None, registry=None)
    return ReloadPublic(**asdict(reloader.status))


@router.post("/reload", status_code=status.HTTP_202_ACCEPTED, response_model=ReloadPublic,
             responses=problems(401, 403, 409))
async def reload(request: Request, scenes: ScenesDep) -> ReloadPublic:
    """Reload to the registry's current version (as its pointer changing or SIGHUP would); follow it with
    ``GET /admin/reload``. While one runs, this answers its progress."""
    reloader = _reloader(request)
    if reloader is None:
        raise NoRegistry(f"this service serves one bundle given by path ({scenes.model.version}), not a registry's "
                         "current version; start it with --registry (or without --model) to reload models")
    return ReloadPublic(**asdict(reloader.request("admin")))
