"""Classification route."""

from __future__ import annotations

from fastapi import APIRouter, File, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from sceneprint.service.deps import ScenesDep
from sceneprint.service.routes.uploads import PROBLEM_RESPONSES, read_uploads
from sceneprint.service.schemas import ClassificationPublic, MatchPublic

router = APIRouter(tags=["classify"])


@router.post("/classify", response_model=ClassificationPublic, responses=PROBLEM_RESPONSES)
async def classify(
    scenes: ScenesDep,
    response: Response,
    file: UploadFile = File(description="One audio clip; audio longer than the encoder's window is "
                                        "embedded over sliding windows and aggregated."),
    top_k: int = Query(3, ge=1, le=100, description="How many of the nearest scenes to return (1-100); fewer "
                                                    "when fewer scenes are enrolled."),
) -> ClassificationPublic:
    """The nearest enrolled scene for a clip, or unknown."""
    (upload,) = await read_uploads([file])
    result = await run_in_threadpool(scenes.classify, upload, top_k)
    # Where the time went, for clients and benchmarks (W3C Server-Timing).
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={v:.2f}" for k, v in result.timings_ms.items())
    d = result.decision
    return ClassificationPublic(scene=d.scene, score=d.score, unknown=d.unknown,
                                top_k=[MatchPublic(scene=m.scene, score=m.score) for m in d.top_k],
                                model_version=result.model_version, duration_s=result.duration_s)
