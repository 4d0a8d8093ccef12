"""Scene routes: enroll, add clips, list, get, delete."""

from __future__ import annotations

from fastapi import APIRouter, File, Response, UploadFile, status
from starlette.concurrency import run_in_threadpool

from sceneprint.service.deps import ScenesDep
from sceneprint.service.routes.uploads import PROBLEM_RESPONSES, read_uploads
from sceneprint.service.scenes import SceneInfo
from sceneprint.service.schemas import SceneList, ScenePublic

router = APIRouter(prefix="/scenes", tags=["scenes"])

# Scene names are matched with the path converter so that names containing '/' reach validation
# (422 invalid_scene_name) instead of falling through to a 404.


def public(info: SceneInfo) -> ScenePublic:
    return ScenePublic(name=info.name, clips=info.clips, model_version=info.model_version, created_at=info.created_at)


@router.post("/{name:path}/enroll", status_code=status.HTTP_201_CREATED, response_model=ScenePublic,
             responses=PROBLEM_RESPONSES)
async def enroll_scene(name: str, scenes: ScenesDep,
                       files: list[UploadFile] = File(description="Exactly five audio clips of the scene.")
                       ) -> ScenePublic:
    """Create a scene from five clips; all or nothing."""
    uploads = await read_uploads(files)
    return public(await run_in_threadpool(scenes.enroll, name, uploads))


@router.post("/{name:path}/clips", response_model=ScenePublic, responses=PROBLEM_RESPONSES)
async def add_clips(name: str, scenes: ScenesDep,
                    files: list[UploadFile] = File(description="One to five more clips of the scene.")
                    ) -> ScenePublic:
    """Add clips to an existing scene and update its prototype."""
    uploads = await read_uploads(files)
    return public(await run_in_threadpool(scenes.add_clips, name, uploads))


@router.get("", response_model=SceneList)
async def list_scenes(scenes: ScenesDep) -> SceneList:
    """All enrolled scenes, by name."""
    return SceneList(scenes=[public(s) for s in await run_in_threadpool(scenes.list_scenes)])


@router.get("/{name:path}", response_model=ScenePublic, responses=PROBLEM_RESPONSES)
async def get_scene(name: str, scenes: ScenesDep) -> ScenePublic:
    """One scene."""
    return public(await run_in_threadpool(scenes.get_scene, name))


@router.delete("/{name:path}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses=PROBLEM_RESPONSES)
async def delete_scene(name: str, scenes: ScenesDep) -> Response:
    """Delete a scene, its clips and its audio."""
    await run_in_threadpool(scenes.delete_scene, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
