"""Reading multipart uploads into memory, within the per-file byte limit."""

from __future__ import annotations

from typing import Any

from fastapi import UploadFile

from sceneprint.service.scenes import Upload
from sceneprint.service.schemas import Problem

PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {"application/problem+json": {}}, "description": text}
    for code, text in [(404, "Scene not found"), (409, "Scene exists"), (413, "Upload too large"),
                       (422, "Invalid scene name, clip count or clip (the problem names the file)"),
                       (503, "Storage or database unavailable")]
}


async def read_uploads(files: list[UploadFile]) -> list[Upload]:
    """The uploaded files' names and bytes. The body size is already bounded by the middleware."""
    return [Upload(filename=f.filename or "", data=await f.read()) for f in files]
