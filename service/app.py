"""The FastAPI application factory. Nothing is built at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from fastapi_offline import FastAPIOffline
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from sceneprint import __version__
from sceneprint.manifest import BundleError, Manifest
from sceneprint.registry import Registry, RegistryError, verify_bundle
from sceneprint.runtime import SessionConfig, limit_blas_threads, load_onnx_encoder, release_free_memory
from sceneprint.service import repository as repo
from sceneprint.service import scenes as scene_service
from sceneprint.service.body_limits import BodyLimitMiddleware, route_body_limit
from sceneprint.service.clipstore import ClipStore
from sceneprint.service.connections import RateLimitedLog
from sceneprint.service.db import make_engine, make_session_factory
from sceneprint.service.errors import PROBLEM_JSON, SceneprintError, StorageUnavailable, from_database_error, problem
from sceneprint.service.index import SceneIndex
from sceneprint.service.keys import KeyRing
from sceneprint.service.metrics import MeteredSceneService, Metrics
from sceneprint.service.migrate import upgrade
from sceneprint.service.reload import Reloader
from sceneprint.service.routes import admin, classify, health, keys, metrics, scenes
from sceneprint.service.scenes import DecisionPolicy, LoadedModel, Quotas, SceneService
from sceneprint.service.schemas import Problem
from sceneprint.service.settings import Settings
from sceneprint.service.storage import create_private_file, make_private_dir, sqlite_path, storage_failure
from sceneprint.service.sync import ChangeFeed, ReplicaSync
from sceneprint.service.telemetry import TelemetryMiddleware

log = logging.getLogger("sceneprint.service")
DEFAULT_UNKNOWN_THRESHOLD = 0.5
# Where format-1 bundles, which predate the manifest's typed field, kept the calibrated threshold.
FORMAT_1_THRESHOLD_REPORT = "heldout_open_set_5way_5shot"


def build_scene_service(settings: Settings, metrics: Metrics | None = None
                        ) -> tuple[SceneService, KeyRing, Engine, ChangeFeed]:
    """Migrate the database, load the bundle and the API keys, and bring the index in line with the database; the
    change feed that keeps it there (started before the index was read, so no change is missed).

    Args:
        settings: The service's settings.
        metrics: Where the service counts its classifications and re-embeddings (default: a registry of its own).
    """
    make_private_dir(settings.data_dir)  # 0700, and the database 0600 (its -wal/-shm follow), whatever the umask
    if settings.registry is None and settings.model_path is None:
        make_private_dir(settings.data_dir / "models")  # the default registry, under the data directory
    url = settings.resolved_database_url
    if (db_file := sqlite_path(url)) is not None:
        with contextlib.suppress(OSError):  # a read-only directory: SQLite opens what exists, or says why not
            create_private_file(db_file)
    upgrade(url)
    limit_blas_threads(settings.inference_threads)  # numpy's share of an embed runs in its slot, like the graph
    engine = make_engine(url, busy_timeout_s=settings.db_busy_timeout_s)
    sessions = make_session_factory(engine)
    model = load_served_model(settings, sessions)
    manifest = model.manifest
    service = MeteredSceneService(
        metrics=metrics or Metrics(), sessions=sessions, store=ClipStore(settings.clip_dir),
        index=SceneIndex(manifest.embedding_dim, settings.index_precision),
        model=model, limits=settings.clip_limits,
        clips_per_enrollment=settings.clips_per_enrollment,
        quotas=Quotas(max_scenes=settings.max_scenes, max_clips_per_scene=settings.max_clips_per_scene,
                      max_stored_bytes=settings.max_stored_bytes),
        decisions=decision_policy(settings, manifest),
        inference_slots=settings.inference_slots,
        reembed_batch_clips=settings.reload_batch_clips,
    )
    feed = ChangeFeed(sessions)
    feed.start()
    report = service.start()
    log.info("model %s loaded, unknown threshold %.3f; %s", model.key, service.unknown_threshold, report)
    return service, KeyRing(sessions), engine, feed


def load_served_model(settings: Settings, sessions: sessionmaker[Session]) -> LoadedModel:
    """The model to serve at start.

    The bundle given by path (``model_path``), if one is. Else, from the registry (seeded with the bundled model
    when empty): the version the service last fully switched to, where the registry's current version differs
    (the reload to that one resumes once the service runs, in the background), else the current version.
    """
    session = SessionConfig(intra_op_threads=settings.inference_threads)
    root = settings.resolved_registry
    if root is None:
        assert settings.model_path is not None
        encoder = load_onnx_encoder(settings.model_path, session=session)
        return LoadedModel(encoder, encoder.manifest)
    registry = Registry(root)
    pointer = registry.seed(settings.seed_bundle)
    with sessions() as db:
        last = repo.last_activated_model(db)
        last_key, last_version = (last.key, last.registry_version) if last is not None else (None, None)
    if last_version is not None and last_version != pointer.version:
        try:
            verified = verify_bundle(registry.path(last_version), session=session)
            if verified.key == last_key:
                log.info("serving registry version %s, the model last switched to; the registry's current version "
                         "%s will be loaded in the background", last_version, pointer.version)
                return LoadedModel(verified.encoder, verified.manifest, registry_version=last_version)
            log.warning("registry version %s is no longer the model %s; serving the current version", last_version,
                        last_key)
        except (BundleError, RegistryError, OSError) as exc:
            log.warning("cannot serve registry version %s again (%s); serving the current version %s", last_version,
                        exc, pointer.version)
    verified = verify_bundle(registry.path(pointer.version), session=session)
    return LoadedModel(verified.encoder, verified.manifest, registry_version=pointer.version)


def decision_policy(settings: Settings, manifest: Manifest) -> DecisionPolicy:
    """Enrollment bounds and the decision rule: each setting given, else the bundle's calibration."""
    cal = manifest.calibration
    if cal is None and (settings.enrollment_min_clip_similarity is None or settings.enrollment_min_cohesion is None):
        log.warning("bundle %s carries no enrollment calibration: enrollments are measured, not refused, unless "
                    "SCENEPRINT_ENROLLMENT_MIN_* are set (`sceneprint bundle calibrate` adds one)",
                    manifest.model_version)
    rule = settings.decision_rule or (cal.rule if cal else "global")
    if rule == "per_scene" and cal is None:
        raise ValueError("decision_rule per_scene needs a calibrated bundle (`sceneprint bundle calibrate`)")
    return DecisionPolicy(
        unknown_threshold=unknown_threshold(settings, manifest),
        min_clip_similarity=(settings.enrollment_min_clip_similarity if settings.enrollment_min_clip_similarity
                             is not None else cal.min_clip_similarity if cal else None),
        min_cohesion=(settings.enrollment_min_cohesion if settings.enrollment_min_cohesion is not None
                      else cal.min_cohesion if cal else None),
        rule=rule, slope=cal.slope if cal else 0.0, reference_cohesion=cal.reference_cohesion if cal else 0.0)


def unknown_threshold(settings: Settings, manifest: Manifest) -> float:
    """The configured threshold, else the one calibrated on held-out classes that the bundle carries."""
    if settings.unknown_threshold is not None:
        return settings.unknown_threshold
    if manifest.unknown_threshold is not None:
        return manifest.unknown_threshold
    if manifest.format_version == 1:
        calibrated = manifest.evaluation.get(FORMAT_1_THRESHOLD_REPORT, {}).get("threshold")
        if calibrated is not None:
            return float(calibrated)
    log.warning("bundle %s carries no calibrated unknown threshold: using %.1f (set SCENEPRINT_UNKNOWN_THRESHOLD "
                "to choose one)", manifest.model_version, DEFAULT_UNKNOWN_THRESHOLD)
    return DEFAULT_UNKNOWN_THRESHOLD


def _on_sighup(handler: Callable[[], object] | None) -> None:
    """Call ``handler`` on SIGHUP (None: stop). Only the main thread's event loop can take signals: a server
    run in another thread (tests) is reloaded through its pointer or ``POST /admin/reload`` instead."""
    loop = asyncio.get_running_loop()
    try:
        if handler is None:
            loop.remove_signal_handler(signal.SIGHUP)
        else:
            loop.add_signal_handler(signal.SIGHUP, handler)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return


async def _refresh_keys(ring: KeyRing, every_s: float) -> None:
    """Re-read the API keys for as long as the app runs; a database outage keeps the last ones read."""
    limited = RateLimitedLog(log)
    while True:
        await asyncio.sleep(every_s)
        try:
            await run_in_threadpool(ring.refresh)
        except Exception as exc:
            limited.warning("keys", "cannot re-read the API keys (%s); the last ones read stay in force",
                            type(exc).__name__)


async def _retry_storage(service: SceneService) -> None:
    """While the disk refuses writes, or clip removals wait, try again every ``STORAGE_RETRY_S``."""
    while True:
        await asyncio.sleep(scene_service.STORAGE_RETRY_S)
        if service.storage_error is not None or service.store.pending:
            try:
                await run_in_threadpool(service.recover_storage)
            except Exception as exc:  # a database outage: the next pass tries again
                log.warning("cannot retry the storage writes (%s)", type(exc).__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. The model, database, index and keys are loaded in the lifespan, not here."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.scenes, app.state.keys, engine, feed = await run_in_threadpool(
            partial(build_scene_service, settings, app.state.metrics))
        release_free_memory()  # what start-up freed goes back to the OS: the idle server's memory
        app.state.sync = ReplicaSync(app.state.scenes, feed, engine, settings.sync_poll_s)
        tasks = [asyncio.create_task(_refresh_keys(app.state.keys, settings.key_refresh_s)),
                 asyncio.create_task(app.state.sync.run()),
                 asyncio.create_task(_retry_storage(app.state.scenes))]
        reloader = None
        root = settings.resolved_registry
        if root is not None:
            reloader = Reloader(app.state.scenes, Registry(root), policy=partial(decision_policy, settings),
                                session=SessionConfig(intra_op_threads=settings.inference_threads),
                                keep_models=settings.kept_models, poll_s=settings.registry_poll_s,
                                metrics=app.state.metrics)
            app.state.reloader = reloader
            tasks.append(asyncio.create_task(reloader.watch()))
            reloader.request("start")  # resumes a reload that a stop interrupted; nothing if up to date
            _on_sighup(lambda: reloader.request("SIGHUP"))
        yield
        if reloader is not None:
            _on_sighup(None)
            await reloader.close()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        app.state.scenes.close()
        engine.dispose()

    # Swagger UI and ReDoc are served from the package's own copies: /docs works offline.
    app = FastAPIOffline(
        title="Sceneprint",
        version=__version__,
        summary="Enroll an acoustic scene from five clips; classify new audio against the enrolled scenes.",
        description="Errors are RFC 9457 problem details (`application/problem+json`) with a stable `code`. "
                    "Requests need an API key (`Authorization: Bearer KEY`) once one exists.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.scenes = None
    app.state.keys = None
    app.state.reloader = None
    app.state.sync = None
    app.state.metrics = Metrics()
    app.state.metrics.watch(lambda: app.state.scenes, settings.inference_slots)
    app.add_middleware(BodyLimitMiddleware, limit=route_body_limit(settings),
                       read_timeout_s=settings.upload_read_timeout_s)
    # Added last, so outermost: it sees (and counts, and logs) the body limits' own answers too.
    app.add_middleware(TelemetryMiddleware, metrics=app.state.metrics)
    app.include_router(scenes.build_router(settings))
    app.include_router(classify.build_router(settings))
    app.include_router(keys.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    _install_error_handlers(app)
    _document_problems(app)
    return app


def _problem_response(request: Request, status: int, code: str, title: str, detail: str,
                      headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, media_type=PROBLEM_JSON, headers=headers,
                        content=problem(status, code, title, detail, instance=request.url.path, **extra))


def _allowed_methods(request: Request) -> str:
    """The methods of the resource at this path: every route of its most specific matching path template.

    Starlette's 405 names only the first route's methods; and ``/scenes/x/enroll`` also matches
    ``/scenes/{name:path}``, which is not the resource the client addressed.
    """
    path = request.scope["path"]
    by_template: dict[str, set[str]] = {}
    for route in iter_route_contexts(request.app.routes):
        if route.methods and route.path and compile_path(route.path)[0].fullmatch(path):
            by_template.setdefault(route.path, set()).update(route.methods)
    if not by_template:
        return ""
    best = max(by_template, key=lambda template: len(re.sub(r"{[^}]*}", "", template)))
    return ", ".join(sorted(by_template[best]))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SceneprintError)
    async def domain_error(request: Request, exc: SceneprintError) -> JSONResponse:
        return _problem_response(request, exc.status, exc.code, exc.title, exc.detail, headers=dict(exc.headers),
                                 **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        return _problem_response(request, 422, "validation_error", "Invalid request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "malformed_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        code = codes.get(exc.status_code, f"http_{exc.status_code}")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return _problem_response(request, exc.status_code, code, code.replace("_", " ").capitalize(),
                                 str(exc.detail), headers=headers)

    @app.exception_handler(OperationalError)
    async def database_error(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database error on %s: %s", request.url.path, exc)
        error = from_database_error(str(exc.orig) if exc.orig is not None else str(exc))
        return _problem_response(request, error.status, error.code, error.title, error.detail,
                                 headers=dict(error.headers))

    @app.exception_handler(OSError)
    async def os_error(request: Request, exc: OSError) -> JSONResponse:
        """A disk that refuses a write (full, read-only) is 503 ``storage_unavailable``; any other OSError is
        raised on, to the server's own 500."""
        reason = storage_failure(exc)
        if reason is None:
            raise exc
        log.warning("storage error on %s: %s", request.url.path, reason)
        error = StorageUnavailable(f"the data directory cannot be written ({reason})")
        return _problem_response(request, error.status, error.code, error.title, error.detail,
                                 headers=dict(error.headers))


def _document_problems(app: FastAPI) -> None:
    """Add the problem document's schema, which the routes' error responses refer to, to the OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}"))
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
