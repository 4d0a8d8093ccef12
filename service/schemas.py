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


class ClipQuality(BaseModel):
    file: str = Field(description="The clip's file name as uploaded (for display).")
    similarity: float | None = Field(description="Cosine similarity of the clip to the prototype of the scene's "
                                                 "other clips (leave-one-out); null for a single clip.")


class SceneQuality(BaseModel):
    """How well a scene's clips agree, under the running model."""

    cohesion: float | None = Field(description="Mean of the clips' leave-one-out similarities.")
    spread: float | None = Field(description="Their standard deviation.")
    clips: list[ClipQuality]
    forced: bool = Field(description="True when clips were stored with force=true past the quality checks.")
    min_clip_similarity: float | None = Field(description="A new clip below this is refused (null: not checked).")
    min_cohesion: float | None = Field(description="A scene below this cohesion is refused (null: not checked).")


class SceneDetail(ScenePublic):
    """A scene with its enrollment quality and the threshold a classification holds it to."""

    threshold: float = Field(description="The best score a clip needs to be named this scene.")
    threshold_source: Literal["scene", "per_scene", "global"] = Field(
        description="scene: set by hand (PATCH); per_scene: from the scene's enrollment by the decision rule; "
                    "global: the service's unknown threshold.")
    quality: SceneQuality


class SceneUpdate(BaseModel):
    model_config = {"extra": "forbid"}

    threshold: float | None = Field(ge=0.0, le=1.0, description="The scene's own threshold (0-1); null returns the "
                                                              "scene to the one the decision rule gives it.")


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
    threshold: float = Field(description="The threshold the best score was held to.")
    threshold_source: Literal["request", "scene", "per_scene", "global"] = Field(
        description="request: this call's `threshold`; scene: the best scene's hand-set one; per_scene: the best "
                    "scene's own, from its enrollment; global: the service's unknown threshold.")
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
    model_key: str | None = Field(default=None, description="The served model's identity: its version and a "
                                                            "fingerprint of its configs, weights and graph.")
    scenes_indexed: int | None = None
    unknown_threshold: float | None = None
    storage: Literal["ok", "unavailable"] | None = Field(
        default=None, description="'unavailable': the data directory refuses writes (full, read-only); reads are "
                                  "served, writes answer 503 storage_unavailable. The service stays ready (200), so "
                                  "a load balancer keeps sending it the reads it can serve.")
    storage_detail: str | None = Field(default=None, description="Why storage is unavailable.")


class ReloadPublic(BaseModel):
    """Where the last (or running) model reload stands, and what the service serves now."""

    state: Literal["idle", "loading", "waiting", "reembedding", "catching_up", "switching", "done", "failed"] = Field(
        description="idle: none since start; loading: checking the new bundle; waiting: another replica on this "
                    "database is re-embedding for the same model; reembedding: embedding every stored "
                    "clip from its audio; catching_up: embedding what was enrolled meanwhile; switching: the last "
                    "catch-up and the swap (writes wait briefly); done; failed: refused, the old model serves.")
    serving_version: str = Field(description="The model version serving now.")
    serving_key: str = Field(description="Its identity key (version@fingerprint).")
    serving_registry_version: str | None = Field(description="The registry version serving now (null: a bundle "
                                                             "given by path).")
    registry: str | None = Field(description="The registry followed (null: none; reloads are refused).")
    target_version: str | None = Field(default=None, description="The registry version being (or last) loaded.")
    target_key: str | None = None
    reason: str | None = Field(default=None, description="What started it: start, pointer changed, SIGHUP, admin.")
    clips_total: int = Field(default=0, description="Stored clips found without an embedding for the new model.")
    clips_done: int = Field(default=0, description="Of those, re-embedded so far.")
    clips_stored: int = Field(default=0, description="Of those, committed to the database: what a restart resumes "
                                                     "from.")
    started_at: datetime | None = None
    finished_at: datetime | None = None
    seconds: float | None = None
    error: str | None = Field(default=None, description="Why it failed.")


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
