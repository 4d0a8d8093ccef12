"""FastAPI dependencies: the request-scoped view of application state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from sceneprint.service.errors import NotReady
from sceneprint.service.scenes import SceneService
from sceneprint.service.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_scene_service(request: Request) -> SceneService:
    service: SceneService | None = getattr(request.app.state, "scenes", None)
    if service is None:
        raise NotReady("the model and index are not loaded yet")
    return service


SettingsDep = Annotated[Settings, Depends(get_settings)]
ScenesDep = Annotated[SceneService, Depends(get_scene_service)]
