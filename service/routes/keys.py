"""API key management (scope ``admin``): the same operations as ``sceneprint keys``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status
from starlette.concurrency import run_in_threadpool

from sceneprint.service.deps import ADMIN, KeyRingDep
from sceneprint.service.keys import Scope
from sceneprint.service.routes.responses import problems
from sceneprint.service.schemas import SCENE_NAME_PATTERN, KeyCreate, KeyCreated, KeyPublic

router = APIRouter(prefix="/keys", tags=["keys"], dependencies=[ADMIN])

KeyName = Annotated[str, Path(description="The key's name.",
                              json_schema_extra={"pattern": SCENE_NAME_PATTERN, "minLength": 1, "maxLength": 64})]


@router.get("", response_model=list[KeyPublic], responses=problems(401, 403))
async def list_keys(ring: KeyRingDep) -> list[KeyPublic]:
    """Every key, revoked ones included; never the keys themselves."""
    return await run_in_threadpool(ring.all_keys)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=KeyCreated,
             responses=problems(400, 401, 403, 409, 413, 422))
async def create_key(body: KeyCreate, ring: KeyRingDep) -> KeyCreated:
    """Create a key; the response holds it, this once."""
    return await run_in_threadpool(lambda: ring.create(name=body.name, scope=Scope(body.scope)))


@router.delete("/{name}", response_model=KeyPublic, responses=problems(401, 403, 404, 422))
async def revoke_key(name: KeyName, ring: KeyRingDep) -> KeyPublic:
    """Revoke a key, at once."""
    return await run_in_threadpool(lambda: ring.revoke(name=name))
