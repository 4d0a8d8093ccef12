"""FastAPI dependencies: the request-scoped view of application state, and access control."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sceneprint.service.errors import Forbidden, NotReady, Unauthorized
from sceneprint.service.keys import KeyRing, Principal, Scope
from sceneprint.service.scenes import SceneService
from sceneprint.service.settings import Settings

bearer = HTTPBearer(
    auto_error=False, scheme_name="apiKey", bearerFormat="sp_<key id>_<secret>",
    description="An API key from `sceneprint keys create`, as `Authorization: Bearer KEY`. Scopes: `classify` "
                "(classify, read scenes and the model), `enroll` (also enroll, add clips, delete), `admin` "
                "(everything, including /keys). While no key exists the service is open on loopback.")


# Dependencies are ``async def``: FastAPI runs a plain ``def`` dependency on its thread pool, a thread hop per
# dependency per request (about 1 ms each on this 2-core VM, measured: bench/bench_service.py's paired breakdown).
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_scene_service(request: Request) -> SceneService:
    service: SceneService | None = getattr(request.app.state, "scenes", None)
    if service is None:
        raise NotReady("the model and index are not loaded yet")
    return service


async def get_key_ring(request: Request) -> KeyRing:
    ring: KeyRing | None = getattr(request.app.state, "keys", None)
    if ring is None:
        raise NotReady("the API keys are not loaded yet")
    return ring


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is this machine's loopback interface."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require(needed: Scope) -> Any:
    """A dependency that lets the request through with a key of scope ``needed`` (or above)."""

    async def check(request: Request,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
        ring = await get_key_ring(request)
        if ring.open:
            # No key exists. Open on loopback (a newcomer on their own machine), or where told to be.
            server = request.scope.get("server")
            if (await get_settings(request)).allow_open or is_loopback(server[0] if server else None):
                return Principal(name=None, scope=Scope.ADMIN)
            raise Unauthorized("no API key exists and this service does not run open on a non-loopback address; "
                               "create a key with `sceneprint keys create` (or start it with --allow-open)")
        if credentials is None:
            raise Unauthorized("send an API key as `Authorization: Bearer KEY`")
        principal = ring.authenticate(credentials.credentials)
        if principal is None:
            raise Unauthorized("the API key is not valid (unknown, malformed or revoked)")
        if not principal.scope.allows(needed):
            raise Forbidden(f"API key {principal.name!r} has scope {principal.scope.value!r}; this request needs "
                            f"{needed.value!r}", scope=principal.scope.value, needed=needed.value)
        return principal

    return Depends(check)


ScenesDep = Annotated[SceneService, Depends(get_scene_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
KeyRingDep = Annotated[KeyRing, Depends(get_key_ring)]
CLASSIFY = require(Scope.CLASSIFY)
ENROLL = require(Scope.ENROLL)
ADMIN = require(Scope.ADMIN)
