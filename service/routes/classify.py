"""Classification route."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from sceneprint.service.deps import CLASSIFY, ScenesDep, SettingsDep
from sceneprint.service.errors import WrongClipCount
from sceneprint.service.routes.responses import UPLOAD, multipart_files, problems
from sceneprint.service.routes.uploads import read_files
from sceneprint.service.schemas import ClassificationPublic, MatchPublic
from sceneprint.service.settings import Settings

MAX_TOP_K = 100


def build_router(settings: Settings) -> APIRouter:
    """The classify route; its documented upload limits are the settings'."""
    router = APIRouter(tags=["classify"])

    @router.post("/classify", response_model=ClassificationPublic, dependencies=[CLASSIFY], responses=problems(*UPLOAD),
                 openapi_extra=multipart_files(
                     "file", min_items=1, max_items=1, max_file_bytes=settings.max_upload_bytes,
                     description="One audio clip (WAV, FLAC, OGG or MP3); audio longer than the encoder's window "
                                 "is embedded over sliding windows and aggregated."))
    async def classify(
        request: Request,
        scenes: ScenesDep,
        settings: SettingsDep,
        response: Response,
        top_k: int = Query(3, ge=1, le=MAX_TOP_K, description=f"How many of the nearest scenes to return "
                                                              f"(1-{MAX_TOP_K}); fewer when fewer scenes are "
                                                              "enrolled."),
        threshold: float | None = Query(None, ge=0.0, le=1.0, description="Hold the best score to this threshold "
                                                                          "(0-1) for this call only, instead of "
                                                                          "the scene's or the service's."),
    ) -> ClassificationPublic:
        """The nearest enrolled scene for a clip, or unknown."""
        uploads = await read_files(request, field_name="file", max_files=1, max_file_bytes=settings.max_upload_bytes)
        if not uploads:
            raise WrongClipCount("send one audio file in the field 'file'", expected=1, received=0)
        result = await scenes.classify(uploads[0], top_k, threshold)
        # Where the time went, for clients and benchmarks (W3C Server-Timing).
        response.headers["Server-Timing"] = ", ".join(f"{k};dur={v:.2f}" for k, v in result.timings_ms.items())
        d = result.decision
        return ClassificationPublic(scene=d.scene, score=d.score, unknown=d.unknown,
                                    top_k=[MatchPublic(scene=m.scene, score=m.score) for m in d.top_k],
                                    threshold=round(d.threshold, 4), threshold_source=d.threshold_source,
                                    model_version=result.model_version, duration_s=result.duration_s)

    return router
