"""What the OpenAPI document says about errors and uploads, so it states every status and limit enforced."""

from __future__ import annotations

from typing import Any

from sceneprint.service.errors import PROBLEM_JSON

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

_WHEN = {
    400: "Malformed request: a body that does not parse (multipart framing, or JSON too deeply nested)",
    401: "No valid API key: send `Authorization: Bearer KEY`",
    403: "The API key lacks the scope this request needs",
    404: "Not found (the problem's `code` says what)",
    408: "The request body did not arrive within the time allowed",
    409: "The name exists, or a quota (`quota_exceeded`, naming it) would be passed",
    413: "A file, or the whole body, is over its byte limit",
    415: "The body is not multipart/form-data",
    422: "Invalid name, parameter, multipart boundary, clip count or clip (the problem names the file)",
    503: "Not ready, storage or database unavailable, too many open connections, or shutting down",
}
# Every route can be refused for too many connections, or while the model loads.
ALWAYS = (503,)
UPLOAD = (400, 401, 403, 408, 413, 415, 422)


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these statuses (and 503), each an RFC 9457 problem document."""
    return {status: {"description": _WHEN[status], "content": {PROBLEM_JSON: {"schema": PROBLEM_REF}}}
            for status in sorted({*statuses, *ALWAYS})}


def multipart_files(field: str, *, min_items: int, max_items: int, max_file_bytes: int,
                    description: str) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads ``field`` as files itself (see ``uploads.read_files``)."""
    binary = {"type": "string", "format": "binary", "description": f"At most {max_file_bytes} bytes."}
    if max_items == 1:
        schema: dict[str, Any] = {**binary, "description": f"{description} {binary['description']}"}
    else:
        schema = {"type": "array", "items": binary, "minItems": min_items, "maxItems": max_items,
                  "description": description}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [field], "properties": {field: schema}}}}}}
