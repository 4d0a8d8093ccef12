"""The FastAPI application factory. Nothing is built at import time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sceneprint import __version__
from sceneprint.bundle import Manifest, load_bundle
from sceneprint.service.body_limits import BodyLimitMiddleware
from sceneprint.service.clipstore import ClipStore
from sceneprint.service.db import make_engine, make_session_factory
from sceneprint.service.errors import PROBLEM_JSON, SceneprintError, from_database_error, problem
from sceneprint.service.index import SceneIndex
from sceneprint.service.migrate import upgrade
from sceneprint.service.routes import classify, health, scenes
from sceneprint.service.scenes import LoadedModel, SceneService
from sceneprint.service.settings import Settings

log = logging.getLogger("sceneprint.service")
DEFAULT_UNKNOWN_THRESHOLD = 0.5


def build_scene_service(settings: Settings) -> tuple[SceneService, Engine]:
    """Migrate the database, load the bundle, and bring the index in line with the database."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url
    upgrade(url)
    encoder, manifest = load_bundle(settings.model_path)
    engine = make_engine(url, busy_timeout_s=settings.db_busy_timeout_s)
    service = SceneService(
        sessions=make_session_factory(engine), store=ClipStore(settings.clip_dir),
        index=SceneIndex(manifest.embedding_dim), model=LoadedModel(encoder, manifest),
        limits=settings.clip_limits, max_upload_bytes=settings.max_upload_bytes,
        clips_per_enrollment=settings.clips_per_enrollment, unknown_threshold=unknown_threshold(settings, manifest),
        torch_threads=settings.torch_threads, inference_slots=settings.inference_slots,
    )
    report = service.start()
    log.info("model %s loaded, unknown threshold %.3f; %s", manifest.model_version, service.unknown_threshold,
             report)
    return service, engine


def unknown_threshold(settings: Settings, manifest: Manifest) -> float:
    """The configured threshold, else the one calibrated on held-out classes and stored in the bundle."""
    if settings.unknown_threshold is not None:
        return settings.unknown_threshold
    calibrated = manifest.evaluation.get("heldout_open_set_5way_5shot", {}).get("threshold")
    return float(calibrated) if calibrated is not None else DEFAULT_UNKNOWN_THRESHOLD


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. The model, database and index are loaded in the lifespan, not here."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.scenes, engine = await run_in_threadpool(build_scene_service, settings)
        yield
        app.state.scenes.close()
        engine.dispose()

    app = FastAPI(
        title="Sceneprint",
        version=__version__,
        summary="Enroll an acoustic scene from five clips; classify new audio against the enrolled scenes.",
        description="Errors are RFC 9457 problem details (`application/problem+json`) with a stable `code`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.scenes = None
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_request_bytes,
                       read_timeout_s=settings.upload_read_timeout_s)
    app.include_router(scenes.router)
    app.include_router(classify.router)
    app.include_router(health.router)
    _install_error_handlers(app)
    return app


def _problem_response(request: Request, status: int, code: str, title: str, detail: str,
                      **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, media_type=PROBLEM_JSON,
                        content=problem(status, code, title, detail, instance=request.url.path, **extra))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SceneprintError)
    async def domain_error(request: Request, exc: SceneprintError) -> JSONResponse:
        return _problem_response(request, exc.status, exc.code, exc.title, exc.detail, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        return _problem_response(request, 422, "validation_error", "Invalid request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "malformed_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        code = codes.get(exc.status_code, f"http_{exc.status_code}")
        return _problem_response(request, exc.status_code, code, code.replace("_", " ").capitalize(),
                                 str(exc.detail))

    @app.exception_handler(OperationalError)
    async def database_error(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database error on %s: %s", request.url.path, exc)
        error = from_database_error(str(exc.orig) if exc.orig is not None else str(exc))
        return _problem_response(request, error.status, error.code, error.title, error.detail)


