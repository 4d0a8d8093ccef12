"""Service settings: one pydantic-settings object, read from ``SCENEPRINT_*`` environment variables.

Nothing about features (sample rate, hop, mel bands) is a service setting: the model bundle says.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sceneprint.audio import ClipLimits


def default_bundle_path() -> Path:
    """The bundled default encoder, shipped inside the package."""
    return Path(str(files("sceneprint.models"))) / "sceneprint-default"


class Settings(BaseSettings):
    """Everything the service can be told, with its environment variable ``SCENEPRINT_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="SCENEPRINT_", env_file=None, extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="Where the database and clip store live.")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty: SQLite file in data_dir.")
    model_path: Path = Field(default_factory=default_bundle_path, description="Encoder bundle directory.")
    min_clip_seconds: float = Field(default=1.0, gt=0)
    max_clip_seconds: float = Field(default=60.0, gt=0)
    max_upload_bytes: int = Field(default=16 * 1024 * 1024, gt=0, description="Per uploaded file.")
    clips_per_enrollment: int = Field(default=5, ge=1, le=50)
    unknown_threshold: float | None = Field(
        default=None, ge=-1.0, le=1.0,
        description="Best cosine score below this is reported as unknown. Default: the threshold the bundle's "
                    "open-set evaluation chose, else 0.5.")
    max_top_k: int = Field(default=100, ge=1)
    upload_read_timeout_s: float = Field(default=30.0, gt=0,
                                         description="A request body that stalls this long is dropped (408).")
    torch_threads: int = Field(default=1, ge=1, description="Intra-op threads per inference call.")
    inference_slots: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1,
        description="Threads that decode and embed clips; further requests queue in order. Default: the CPU "
                    "count, so concurrent requests do not time-slice the cores (which inflates tail latency).")
    db_busy_timeout_s: float = Field(default=5.0, gt=0, description="How long a write waits on a locked SQLite "
                                                                    "database before failing with 503.")

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.min_clip_seconds >= self.max_clip_seconds:
            raise ValueError("min_clip_seconds must be below max_clip_seconds")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'sceneprint.db').resolve()}"

    @property
    def clip_dir(self) -> Path:
        return self.data_dir / "clips"

    @property
    def clip_limits(self) -> ClipLimits:
        return ClipLimits(min_seconds=self.min_clip_seconds, max_seconds=self.max_clip_seconds)

    @property
    def max_request_bytes(self) -> int:
        """Largest request body: a full enrollment plus room for multipart framing."""
        return self.clips_per_enrollment * self.max_upload_bytes + 1024 * 1024
