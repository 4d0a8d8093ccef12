"""Request and response bodies of the public API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

SCENE_NAME_PATTERN = r"^[a-z0-9_-]{1,64}$"


class ScenePublic(BaseModel):
    """A scene, as every route and the repository show it."""

    model_config = {"frozen": True}

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
    access: Literal["keys", "open"] | None = Field(
        default=None, description="'open': no API key exists, so requests need none (loopback only unless "
                                  "--allow-open); 'keys': every request but the health checks needs one.")
    model_version: str | None = None
    scenes_indexed: int | None = None
    unknown_threshold: float | None = None


class KeyCreate(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(pattern=SCENE_NAME_PATTERN, min_length=1, max_length=64, examples=["ci"])
    scope: Literal["classify", "enroll", "admin"] = Field(
        description="classify: classify and read; enroll: also enroll, add clips, delete; admin: everything.")


class KeyPublic(BaseModel):
    """An API key as listed: never the key itself."""

    name: str
    scope: str
    created_at: datetime
    revoked_at: datetime | None = None


class KeyCreated(KeyPublic):
    key: str = Field(description="The key, shown this once: send it as `Authorization: Bearer KEY`.")


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
