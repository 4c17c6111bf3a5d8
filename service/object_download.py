"""One file of object storage (gs://) sent as an HTTP download, with a single byte range when
the client asks for one: what Starlette's FileResponse does for local files, for files it
cannot open by a local path. Multi-range requests get the whole file (RFC 9110 lets a server
ignore Range)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import quote

from etils import epath
from starlette.responses import Response, StreamingResponse

CHUNK_BYTES = 1 << 20
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte span [first, last] of a file of `size` bytes that a Range header
    asks for; None when it asks for the whole file (no header, several ranges, or a header
    this does not parse). ValueError when the span lies outside the file (416)."""
    match = _RANGE.fullmatch((header or "").strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        count = int(last)
        if count == 0:
            raise ValueError("an empty suffix range")
        return max(size - count, 0), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or start > end:
        raise ValueError(f"bytes {first}-{last} lie outside the file's {size} bytes")
    return start, end


def _read(path: epath.Path, start: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        while length > 0:
            chunk = f.read(min(CHUNK_BYTES, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk


def object_response(
    path: epath.Path, size: int, range_header: str | None, filename: str
) -> Response:
    """The file at `path` (`size` bytes) as a download named `filename`: 200 with every byte,
    206 with the asked range, or 416 for a range outside the file. Read in CHUNK_BYTES
    pieces on Starlette's thread pool, never whole in memory."""
    headers = {
        "accept-ranges": "bytes",
        "content-disposition": f"attachment; filename*=utf-8''{quote(filename)}",
    }
    try:
        span = byte_range(range_header, size)
    except ValueError:
        return Response(status_code=416, headers={**headers, "content-range": f"bytes */{size}"})
    first, last, status = (0, size - 1, 200) if span is None else (*span, 206)
    if status == 206:
        headers["content-range"] = f"bytes {first}-{last}/{size}"
    headers["content-length"] = str(last - first + 1)
    return StreamingResponse(
        _read(path, first, last - first + 1),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )
