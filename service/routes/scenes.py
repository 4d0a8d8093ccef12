"""Scene routes: enroll, add clips, list, get, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status
from starlette.convertors import Convertor, register_url_convertor

from sceneprint.service.deps import CLASSIFY, ENROLL, ScenesDep, SettingsDep
from sceneprint.service.routes.responses import UPLOAD, multipart_files, problems
from sceneprint.service.routes.uploads import read_files
from sceneprint.service.scenes import check_scene_name
from sceneprint.service.schemas import SCENE_NAME_PATTERN, SceneDetail, SceneList, SceneUpdate
from sceneprint.service.settings import Settings


class SceneNameConvertor(Convertor[str]):
    r"""A scene name in a path, matched loosely so that names containing '/' reach validation (422
    ``invalid_scene_name``) instead of falling through to a 404; but not a path that ends in a scene's
    sub-resource (``/enroll``, ``/clips``), which belongs to those routes (GET there is a 405).

    ``[\s\S]``, not ``.``: a name with a newline (``a%0Ab``) must match too, and be refused as a name; with
    ``.`` it fell through to a 404, and ``a%0A`` matched as ``a`` (the route's ``$`` matches before a final
    newline), addressing another scene."""

    regex = r"(?![\s\S]*/(?:enroll|clips)\Z)[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class ScenePrefixConvertor(SceneNameConvertor):
    r"""The scene name before a sub-resource (``/scenes/{name}/enroll``): anything, control characters included,
    so that they reach validation (422) rather than a 404; but not a path that ends in a newline, which the
    route's ``$`` would let ``/scenes/a/enroll%0A`` match as scene ``a``."""

    regex = r"(?![\s\S]*\n\Z)[\s\S]*"


register_url_convertor("scene", SceneNameConvertor())
register_url_convertor("sceneprefix", ScenePrefixConvertor())
# The service checks the name's pattern (one rule, one error code); the schema states it.
SceneName = Annotated[str, Path(description="1-64 characters of a-z, 0-9, '-' and '_'.",
                                json_schema_extra={"pattern": SCENE_NAME_PATTERN, "minLength": 1, "maxLength": 64})]
Force = Annotated[bool, Query(description="Store the clips even where they disagree with each other (the scene "
                                          "records that it was forced); without it such clips get 422 "
                                          "incoherent_clips and nothing is stored.")]


def build_router(settings: Settings) -> APIRouter:
    """The scene routes; their documented upload limits are the settings'."""
    router = APIRouter(prefix="/scenes", tags=["scenes"])
    n, per_file = settings.clips_per_enrollment, settings.max_upload_bytes

    @router.post("/{name:sceneprefix}/enroll", status_code=status.HTTP_201_CREATED, response_model=SceneDetail,
                 dependencies=[ENROLL], responses=problems(*UPLOAD, 409),
                 openapi_extra=multipart_files("files", min_items=n, max_items=n, max_file_bytes=per_file,
                                               description=f"Exactly {n} audio clips of the scene."))
    async def enroll_scene(name: SceneName, request: Request, scenes: ScenesDep, settings: SettingsDep,
                           force: Force = False) -> SceneDetail:
        """Create a scene from five clips; all or nothing. The response shows how well the clips agree."""
        check_scene_name(name)  # before the upload is read
        uploads = await read_files(request, field_name="files", max_files=settings.clips_per_enrollment,
                                   max_file_bytes=settings.max_upload_bytes)
        return await scenes.enroll(name, uploads, force=force)

    @router.post("/{name:sceneprefix}/clips", response_model=SceneDetail, dependencies=[ENROLL],
                 responses=problems(*UPLOAD, 404, 409),
                 openapi_extra=multipart_files("files", min_items=1, max_items=n, max_file_bytes=per_file,
                                               description=f"One to {n} more clips of the scene."))
    async def add_clips(name: SceneName, request: Request, scenes: ScenesDep, settings: SettingsDep,
                        force: Force = False) -> SceneDetail:
        """Add clips to an existing scene and update its prototype."""
        check_scene_name(name)
        uploads = await read_files(request, field_name="files", max_files=settings.clips_per_enrollment,
                                   max_file_bytes=settings.max_upload_bytes)
        return await scenes.add_clips(name, uploads, force=force)

    @router.get("", response_model=SceneList, dependencies=[CLASSIFY], responses=problems(401, 403))
    async def list_scenes(scenes: ScenesDep) -> SceneList:
        """All enrolled scenes, by name."""
        return SceneList(scenes=await scenes.list_scenes())

    @router.get("/{name:scene}", response_model=SceneDetail, dependencies=[CLASSIFY],
                responses=problems(401, 403, 404, 422))
    async def get_scene(name: SceneName, scenes: ScenesDep) -> SceneDetail:
        """One scene, with how well its clips agree and the threshold in force for it."""
        return await scenes.get_scene(name)

    @router.patch("/{name:scene}", response_model=SceneDetail, dependencies=[ENROLL],
                  responses=problems(400, 401, 403, 404, 422))
    async def update_scene(name: SceneName, body: SceneUpdate, scenes: ScenesDep) -> SceneDetail:
        """Set the scene's own threshold by hand (null: back to the one the decision rule gives it)."""
        return await scenes.set_threshold(name, body.threshold)

    @router.delete("/{name:scene}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
                   dependencies=[ENROLL], responses=problems(401, 403, 404, 422))
    async def delete_scene(name: SceneName, scenes: ScenesDep) -> Response:
        """Delete a scene, its clips and its audio."""
        await scenes.delete_scene(name)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return router
