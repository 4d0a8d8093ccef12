"""Prometheus metrics of this process (no API key: counts only; see ``service/metrics.py``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder

from sceneprint.service.metrics import Metrics

router = APIRouter(tags=["metrics"])


# Not in the OpenAPI document: it is the operators' scrape endpoint, not part of the API that clients use.
# A plain def: a scrape counts the scenes in the database, which must not block the event loop.
@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Request, classification and model metrics in Prometheus' text format (OpenMetrics if the scraper asks)."""
    registry: Metrics = request.app.state.metrics
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry.registry), media_type=content_type)
