"""One JSON log line and one telemetry count per generation request, whichever protocol carried it.

Both front ends (gRPC in grpc_server.py, the OpenAI-compatible HTTP API in server/http/) fill a
`RequestRecord` while they serve a request and call `finish` once at the end, so an operator reads the same
line shape for both, told apart by `protocol`:

    {"event": "request", "protocol": "http", "rpc": "/v1/chat/completions", "request_id": "chatcmpl-...",
     "status": "OK", "http_status": 200, "finish_reason": "length", "prompt_tokens": 12,
     "completion_tokens": 16, "queue_s": 0.0004, "ttft_s": 0.031, "total_s": 0.19}

`status` is a gRPC status name on both protocols (an HTTP error is counted under its gRPC equivalent, e.g.
429 -> RESOURCE_EXHAUSTED), so the `moe_runtime_requests_finished{reason}` label set stays one bounded set.
Times are seconds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from moe_runtime.telemetry import Telemetry

request_log = logging.getLogger("moe_runtime.server.requests")


@dataclass
class RequestRecord:
    """What the request log line and the telemetry need to know about one call."""

    protocol: str  # "grpc" or "http"
    rpc: str  # the gRPC method, or the HTTP path
    request_id: str = ""
    status: str = "OK"  # a gRPC status name
    last: Any = None  # the engine's last RequestOutput
    http_status: int | None = None  # the HTTP status answered (HTTP only)

    def finish(self, telemetry: Telemetry | None, started: float) -> None:
        """Count the call in telemetry (latencies only for requests that ran to a finish) and log its line.
        `started`: `time.monotonic()` when the call arrived."""
        out = self.last
        m = out.metrics if out is not None else None
        finished = out is not None and out.finished
        if telemetry is not None and finished:
            telemetry.observe_request(out.finish_reason, m.queue_time_s, m.ttft_s, m.e2e_s, out.num_output_tokens,
                                      out.num_prompt_tokens)
        elif telemetry is not None and self.status != "OK":
            telemetry.observe_request(self.status.lower())
        line = {"event": "request", "protocol": self.protocol, "rpc": self.rpc, "request_id": self.request_id,
                "status": self.status}
        if self.http_status is not None:
            line["http_status"] = self.http_status
        request_log.info(json.dumps({
            **line,
            "finish_reason": out.finish_reason if finished else None,
            "prompt_tokens": out.num_prompt_tokens if out is not None else 0,
            "completion_tokens": out.num_output_tokens if out is not None else 0,
            "queue_s": _round(m.queue_time_s if m else None), "ttft_s": _round(m.ttft_s if m else None),
            "total_s": round(time.monotonic() - started, 6),
        }))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)
