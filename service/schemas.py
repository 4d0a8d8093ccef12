"""Request and response bodies of the public API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class ScenePublic(BaseModel):
    name: str = Field(examples=["kitchen"])
    clips: int = Field(description="Number of clips enrolled in the scene.")
    model_version: str | None = Field(description="Model version of the scene's current prototype.")
    created_at: datetime


class SceneList(BaseModel):
    scenes: list[ScenePublic]


class MatchPublic(BaseModel):
    scene: str
    score: float = Field(description="Cosine similarity between the clip and the scene prototype, -1..1.")


class ClassificationPublic(BaseModel):
    scene: str | None = Field(description="The nearest scene, or null when unknown.")
    score: float = Field(description="Best cosine score (0.0 when no scene is enrolled).")
    unknown: bool = Field(description="True when the best score is below the unknown threshold or no scene exists.")
    top_k: list[MatchPublic]
    model_version: str
    duration_s: float = Field(description="Duration of the decoded clip, in seconds.")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model_version: str | None = None
    scenes_indexed: int | None = None
    unknown_threshold: float | None = None


class Problem(BaseModel):
    """RFC 9457 problem details; ``code`` is stable and meant for programs."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    file: str | None = None

    model_config = {"extra": "allow"}


ManifestPublic = dict[str, Any]
