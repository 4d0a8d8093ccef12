"""Multipart uploads, parsed while they stream in: each file is bounded as it arrives.

FastAPI's ``UploadFile`` spools a whole file to disk before a route sees it, so a per-file limit could
only be checked after the fact; here a file over the limit is refused (413, naming it) as soon as its
bytes pass the limit, and the files past the count a route takes are counted without being kept.
Part headers may be long (a 10,000-character file name is a file name, shortened for display later).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from sceneprint.service.errors import InvalidBoundary, MalformedRequest, TooLarge, UnsupportedMediaType, WrongClipCount
from sceneprint.service.scenes import Upload, display_filename

MAX_PART_HEADER_BYTES = 64 * 1024  # one part header line: room for a long, percent-encoded file name
MAX_PART_HEADERS = 16
# Bytes of multipart framing allowed per file (boundary lines and part headers) on top of its content,
# and per request; what the body limits add to the files' own limits.
PART_OVERHEAD_BYTES = MAX_PART_HEADER_BYTES + 4 * 1024
REQUEST_OVERHEAD_BYTES = 64 * 1024
MAX_BOUNDARY_CHARS = 256  # python-multipart's limit


@dataclass
class _Part:
    name: str = ""
    filename: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    kept: bool = False  # a file of the requested field, within the count


async def read_files(request: Request, *, field_name: str, max_files: int, max_file_bytes: int) -> list[Upload]:
    """The files of multipart field ``field_name``, in order.

    Args:
        request: A ``multipart/form-data`` request.
        field_name: The form field that carries the files; other fields are read past and ignored.
        max_files: The most files the route takes.
        max_file_bytes: The byte limit of one file.

    Returns:
        The uploads (possibly none: the caller says how many it needs).

    Raises:
        UnsupportedMediaType: Not ``multipart/form-data``.
        MalformedRequest: A body that is not valid multipart.
        InvalidBoundary: A boundary too long for the parser (422).
        TooLarge: A file over ``max_file_bytes``, as soon as it is.
        WrongClipCount: More than ``max_files`` files (counted to the end of the body).
    """
    media_type, options = parse_options_header(request.headers.get("content-type", ""))
    if media_type != b"multipart/form-data":
        raise UnsupportedMediaType(f"send the audio as multipart/form-data in the field {field_name!r}, not as "
                                   f"{media_type.decode('latin-1')[:80] or 'a body without a content type'}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedRequest("the multipart/form-data content type has no boundary")

    uploads: list[Upload] = []
    received = 0
    part = _Part()
    header_name = b""
    header_value = b""
    ended = False

    def on_part_begin() -> None:
        nonlocal part
        part = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        nonlocal header_name
        header_name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        nonlocal header_value
        header_value += data[start:end]

    def on_header_end() -> None:
        nonlocal header_name, header_value
        part.headers.append((header_name.lower(), header_value))
        header_name = header_value = b""

    def on_headers_finished() -> None:
        nonlocal received
        for name, value in part.headers:
            if name == b"content-disposition":
                _, params = parse_options_header(value.decode("latin-1"))
                part.name = params.get(b"name", b"").decode("utf-8", "replace")
                part.filename = params.get(b"filename", b"").decode("utf-8", "replace")
        if part.name == field_name:
            received += 1
            part.kept = received <= max_files

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if not part.kept:
            return
        part.size += end - start
        if part.size > max_file_bytes:
            shown = display_filename(part.filename)
            raise TooLarge(f"file {shown!r} is over the {max_file_bytes}-byte limit per file", file=shown)
        part.chunks.append(data[start:end])

    def on_part_end() -> None:
        if part.kept:
            uploads.append(Upload(filename=part.filename, data=b"".join(part.chunks)))

    def on_end() -> None:
        nonlocal ended
        ended = True

    try:
        parser = MultipartParser(boundary, {
            "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
            "on_part_end": on_part_end, "on_end": on_end,
        }, max_header_count=MAX_PART_HEADERS, max_header_size=MAX_PART_HEADER_BYTES)
    except FormParserError:  # the constructor refuses a boundary over 256 bytes, before any body is read
        raise InvalidBoundary(f"the multipart boundary is {len(boundary)} characters long; use at most "
                              f"{MAX_BOUNDARY_CHARS} (RFC 2046 allows 70)") from None
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise MalformedRequest("the multipart/form-data body is malformed") from None
    if not ended:
        raise MalformedRequest("the multipart/form-data body ends before its closing boundary")
    if received > max_files:
        raise WrongClipCount(f"send at most {max_files} files in {field_name!r}, got {received}",
                             expected=max_files, received=received)
    return uploads
