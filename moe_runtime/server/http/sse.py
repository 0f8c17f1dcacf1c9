"""Server-sent events as OpenAI streams them: one `data: <json>` event per chunk, then `data: [DONE]`.

Once the 200 and the first event are out, an error can no longer change the status: it goes as one more
event, `data: {"error": {...}}` (OpenAI's error shape, which the openai client raises as `APIError`),
followed by `data: [DONE]`. Cancellation (the client went away) is not an error: it propagates, so that
the request is aborted in the engine and no more bytes are written.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from moe_runtime.server.http.errors import ApiError

MEDIA_TYPE = "text/event-stream"
DONE = b"data: [DONE]\n\n"
# No caching, and no buffering by nginx-style proxies: every event is sent as soon as it exists.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(data: dict[str, Any]) -> bytes:
    """One SSE event holding `data` as compact JSON (one line: JSON never contains a raw newline)."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def sse_stream(chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[bytes]:
    """The events of `chunks`, then [DONE]; an `ApiError` from `chunks` becomes an error event first."""
    async with contextlib.aclosing(chunks):  # closed at once when the client leaves: that aborts the request
        try:
            async for chunk in chunks:
                yield event(chunk)
        except ApiError as e:
            yield event(e.body())
    yield DONE
