"""Domain errors, each with an HTTP status and a stable ``code``, rendered as RFC 9457 problem+json."""

from __future__ import annotations

from typing import Any, ClassVar

from sceneprint.audio import AudioError

PROBLEM_JSON = "application/problem+json"


class SceneprintError(Exception):
    """Base of every error the API reports on purpose."""

    status = 400
    code = "bad_request"
    title = "Bad request"
    headers: ClassVar[tuple[tuple[str, str], ...]] = ()  # extra response headers

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class MalformedRequest(SceneprintError):
    status, code, title = 400, "malformed_request", "Malformed request"
    # The rest of the body cannot be trusted to be framed: do not read another request after it.
    headers = (("Connection", "close"),)


class InvalidBoundary(MalformedRequest):
    """A multipart boundary the parser cannot take (over 256 characters; RFC 2046 allows 70): a request that is
    well framed but unprocessable, so 422, like the other refusals of what a request carries."""

    status, code, title = 422, "invalid_boundary", "Invalid multipart boundary"


class ShuttingDown(SceneprintError):
    """A request still running when the shutdown grace period ended (answered by the server, not a route)."""

    status, code, title = 503, "shutting_down", "Service shutting down"
    headers = (("Retry-After", "1"), ("Connection", "close"))


class Unauthorized(SceneprintError):
    status, code, title = 401, "unauthorized", "API key missing or invalid"
    headers = (("WWW-Authenticate", 'Bearer realm="sceneprint"'),)


class Forbidden(SceneprintError):
    status, code, title = 403, "forbidden", "API key lacks the scope"


class UnsupportedMediaType(SceneprintError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class QuotaExceeded(SceneprintError):
    """A quota (a setting) would be passed; the problem names it and its value."""

    status, code, title = 409, "quota_exceeded", "Quota exceeded"

    def __init__(self, detail: str, *, quota: str, limit: int) -> None:
        super().__init__(detail, quota=quota, limit=limit)


class KeyNotFound(SceneprintError):
    status, code, title = 404, "key_not_found", "API key not found"


class InvalidKeyName(SceneprintError):
    status, code, title = 422, "invalid_key_name", "Invalid API key name"


class KeyExists(SceneprintError):
    status, code, title = 409, "key_exists", "API key name already used"


class InvalidSceneName(SceneprintError):
    status, code, title = 422, "invalid_scene_name", "Invalid scene name"


class SceneNotFound(SceneprintError):
    status, code, title = 404, "scene_not_found", "Scene not found"


class SceneExists(SceneprintError):
    status, code, title = 409, "scene_exists", "Scene already exists"


class WrongClipCount(SceneprintError):
    status, code, title = 422, "wrong_clip_count", "Wrong number of clips"


class DuplicateClips(SceneprintError):
    status, code, title = 422, "duplicate_clips", "Duplicate clips"


class IncoherentClips(SceneprintError):
    """Clips that disagree with the scene's other clips; the problem names them with their similarities."""

    status, code, title = 422, "incoherent_clips", "Clips disagree"


class TooLarge(SceneprintError):
    status, code, title = 413, "too_large", "Upload too large"
    # Answered before the body was read whole: the connection is closed rather than drained.
    headers = (("Connection", "close"),)


class ClipRejected(SceneprintError):
    """One uploaded clip is unusable; the problem names the file and carries the audio error's code."""

    status, title = 422, "Clip rejected"

    def __init__(self, filename: str, error: AudioError) -> None:
        super().__init__(f"clip {filename!r}: {error.reason}", file=filename)
        self.code = error.code


class StorageUnavailable(SceneprintError):
    """The disk or database refuses writes (full, read-only); reads still work. Retried by the service every few
    seconds and on the next write."""

    status, code, title = 503, "storage_unavailable", "Storage unavailable"
    headers = (("Retry-After", "5"),)


class DatabaseBusy(SceneprintError):
    status, code, title = 503, "database_busy", "Database busy"


class DatabaseUnavailable(SceneprintError):
    status, code, title = 503, "database_unavailable", "Database unavailable"


class NotReady(SceneprintError):
    status, code, title = 503, "not_ready", "Service not ready"


class NoRegistry(SceneprintError):
    """A reload was asked of a service that serves one bundle by path, not a registry's current version."""

    status, code, title = 409, "no_registry", "No model registry"


def problem(status: int, code: str, title: str, detail: str, instance: str | None = None,
            **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem document."""
    body: dict[str, Any] = {"type": f"urn:sceneprint:problem:{code}", "title": title, "status": status,
                            "detail": detail, "code": code}
    if instance is not None:
        body["instance"] = instance
    body.update(extra)
    return body


def from_database_error(message: str) -> SceneprintError:
    """The API error for a database failure, from the driver's message."""
    text = message.lower()
    if "locked" in text or "busy" in text:
        return DatabaseBusy("the database stayed locked by another writer; retry shortly")
    if "readonly" in text or "read-only" in text or "disk" in text or "full" in text:
        return StorageUnavailable(f"the database cannot be written: {message}")
    return DatabaseUnavailable("the database cannot be reached; retry shortly")
