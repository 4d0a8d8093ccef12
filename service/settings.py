"""Service settings: one pydantic-settings object, read from ``SCENEPRINT_*`` environment variables.

Nothing about features (sample rate, hop, mel bands) is a service setting: the model bundle says.
A ``SCENEPRINT_*`` variable that names no setting is an error, so a misspelt setting is never
silently ignored. An empty one means the default (Docker Compose passes ``VAR=`` for a variable left
empty in ``.env``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sceneprint.audio import ClipLimits
from sceneprint.manifest import default_bundle_path
from sceneprint.service.logs import LogFormat

ENV_PREFIX = "SCENEPRINT_"
# Variables with the prefix that other parts of the project read; they are not service settings.
OTHER_VARIABLES = {"SCENEPRINT_DEV_DATA": "the training data folder (sceneprint.training, tests)"}
RENAMED_VARIABLES = {"SCENEPRINT_LIMIT_CONCURRENCY": "SCENEPRINT_MAX_CONNECTIONS",
                     "SCENEPRINT_TORCH_THREADS": "SCENEPRINT_INFERENCE_THREADS"}
GIB = 1024**3


class Settings(BaseSettings):
    """Everything the service can be told, with its environment variable ``SCENEPRINT_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=None, extra="forbid", env_ignore_empty=True)

    data_dir: Path = Field(default=Path("data"), description="Where the database and clip store live.")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty: SQLite file in data_dir.")
    model_path: Path | None = Field(
        default=None, description="One encoder bundle directory, served as it is, without a registry (no reloads). "
                                  "Default: the registry's current version.")
    registry: Path | None = Field(
        default=None, description="The model registry directory whose current version is served and followed "
                                  "(reloaded when its pointer changes). Default: <data_dir>/models, seeded with the "
                                  "bundled model on first start.")
    registry_poll_s: float = Field(default=1.0, gt=0, le=3600,
                                   description="How often the registry's pointer is checked for a new version.")
    sync_poll_s: float = Field(default=1.0, gt=0, le=3600,
                               description="How often each replica reads the scene change log when no notification "
                                           "wakes it (PostgreSQL's NOTIFY wakes it at once): the bound on how long "
                                           "an enrollment or deletion made through another replica takes to reach "
                                           "this one's classifications.")
    kept_models: int = Field(default=3, ge=1, description="Embeddings and prototypes of this many most recently "
                                                          "served models are kept (a rollback to one is immediate); "
                                                          "older ones are deleted.")
    reload_batch_clips: int = Field(default=2, ge=1, le=256,
                                    description="Stored clips one re-embedding job embeds (on the reload's own "
                                                "low-priority threads, one per inference slot).")
    min_clip_seconds: float = Field(default=1.0, gt=0)
    max_clip_seconds: float = Field(default=60.0, gt=0)
    max_upload_bytes: int = Field(default=16 * 1024 * 1024, gt=0, description="Per uploaded file.")
    clips_per_enrollment: int = Field(default=5, ge=1, le=50)
    unknown_threshold: float | None = Field(
        default=None, ge=-1.0, le=1.0,
        description="Best cosine score below this is reported as unknown. Default: the threshold calibrated on "
                    "held-out classes that the bundle's manifest carries, else 0.5.")
    enrollment_min_clip_similarity: float | None = Field(
        default=None, ge=-1.0, le=1.0,
        description="A clip whose cosine to the prototype of the scene's other clips is below this is refused "
                    "(422 incoherent_clips, unless force=true). Default: the bundle's calibration; without one, "
                    "clips are measured but not refused.")
    enrollment_min_cohesion: float | None = Field(
        default=None, ge=-1.0, le=1.0,
        description="A scene whose clips' mean leave-one-out similarity is below this is refused. Default: the "
                    "bundle's calibration.")
    decision_rule: Literal["global", "per_scene"] | None = Field(
        default=None, description="global: every scene is held to the unknown threshold; per_scene: each scene to "
                                  "its own, from its enrollment. Default: the rule the bundle's calibration chose.")
    index_precision: Literal["float32", "float16"] = Field(
        default="float16", description="How the scene index holds prototypes: float16 halves the memory a search "
                                       "reads (scores within 1e-4 of float32's); float32 is exact.")
    inference_threads: int = Field(default=1, ge=1, description="ONNX Runtime intra-op threads per inference call "
                                                                "(per inference slot).")
    inference_slots: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1,
        description="Threads that decode and embed clips; further requests queue in order. Default: the CPU "
                    "count, so concurrent requests do not time-slice the cores (which inflates tail latency).")
    db_busy_timeout_s: float = Field(default=5.0, gt=0, description="How long a write waits on a locked SQLite "
                                                                    "database before failing with 503.")

    # Access.
    allow_open: bool = Field(default=False, description="Serve without API keys on a non-loopback address. "
                                                        "Without it, a service with no key answers only on "
                                                        "loopback.")
    key_refresh_s: float = Field(default=0.5, gt=0, le=60,
                                 description="How often keys created or revoked elsewhere (the CLI, another "
                                             "replica) are read from the database.")

    # Quotas: what a client may store.
    max_scenes: int = Field(default=10_000, ge=1, description="Scenes, in all.")
    max_clips_per_scene: int = Field(default=500, ge=1, description="Clips in one scene.")
    max_stored_bytes: int = Field(default=32 * GIB, ge=1, description="Audio in the clip store, in bytes.")

    # Connections: slow and abusive clients.
    header_timeout_s: float = Field(default=10.0, gt=0, description="A request's headers must arrive within this "
                                                                    "(from connect, or from its first byte on a "
                                                                    "kept-alive connection); else 408 and close.")
    keep_alive_timeout_s: int = Field(default=5, ge=1, description="An idle kept-alive connection is closed "
                                                                       "after this.")
    body_timeout_s: float = Field(default=120.0, gt=0, description="A request body must arrive whole within this; "
                                                                   "else 408 and close.")
    upload_read_timeout_s: float = Field(default=30.0, gt=0,
                                         description="A request body that stalls this long is dropped (408).")
    max_connections: int = Field(default=1024, ge=1,
                                 description="Open connections; past it, the oldest connection still waiting for "
                                             "a request is closed to make room, else the new one gets 503.")
    shutdown_grace_s: int = Field(default=10, ge=0, description="On SIGTERM, requests in flight get this long "
                                                                    "to finish; then they are cancelled.")

    # Logs.
    log_format: LogFormat = Field(
        default="auto", description="How `serve` writes its log to stderr: one JSON object a line (`json`), or text "
                                    "for a person (`text`); `auto`: text in a terminal, else JSON.")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_variables(cls, data: Any) -> Any:
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields}
        unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX)
                         and k.upper() not in known and k.upper() not in OTHER_VARIABLES)
        if unknown:
            raise ValueError("; ".join(_unknown_variable(name, known) for name in unknown))
        return data

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.min_clip_seconds >= self.max_clip_seconds:
            raise ValueError("min_clip_seconds must be below max_clip_seconds")
        return self

    @property
    def resolved_registry(self) -> Path | None:
        """The registry served from; None when one bundle is served by path (``model_path``, which wins over a
        registry: Compose sets one by default)."""
        if self.model_path is not None:
            return None
        return self.registry if self.registry is not None else self.data_dir / "models"

    @property
    def seed_bundle(self) -> Path:
        """The bundle an empty registry is seeded with on the service's first start: the bundled model."""
        return default_bundle_path()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'sceneprint.db').resolve()}"

    @property
    def clip_dir(self) -> Path:
        return self.data_dir / "clips"

    @property
    def clip_limits(self) -> ClipLimits:
        return ClipLimits(min_seconds=self.min_clip_seconds, max_seconds=self.max_clip_seconds)


def _unknown_variable(name: str, known: set[str]) -> str:
    upper = name.upper()
    if upper in RENAMED_VARIABLES:
        return f"{name} is no longer read: use {RENAMED_VARIABLES[upper]}"
    close = difflib.get_close_matches(upper, sorted(known), n=1)
    hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(known))}"
    return f"{name} is not a Sceneprint setting ({hint})"
