"""The server's log formats, and the one line it logs per request.

`text` (the default) is for people: `time level logger: message`. `json` is for machines: one
JSON object per line with the time, level, logger and message, and for a request line its
fields (`request_id`, `user`, `operation`, `status`, `outcome`, `duration_ms`) as keys of
their own, so that a log pipeline needs no parsing of the message.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")

request_log = logging.getLogger("tinker_jax.requests")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: `time` (UTC, ISO 8601), `level`, `logger`, `message`, the
    record's `fields` (a request line's) and, for an exception, `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of `log_format` ("text" or "json")."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


@dataclasses.dataclass
class RequestEntry:
    """What a front end learns about a request while answering it: the user (name) once the
    key is checked, the request id (the future's, or the client's idempotency key) once known."""

    operation: str
    user: str = "-"
    request_id: str = "-"
    started: float = dataclasses.field(default_factory=time.monotonic)

    def log(self, outcome: str, status: int | None = None) -> None:
        """Logs the request's one line (INFO, logger `tinker_jax.requests`): `outcome` is OK
        or the failure's status name, `status` the HTTP status (None over gRPC: "-")."""
        ms = round((time.monotonic() - self.started) * 1000, 1)
        fields = {
            "request_id": self.request_id,
            "user": self.user,
            "operation": self.operation,
            "status": status,
            "outcome": outcome,
            "duration_ms": ms,
        }
        request_log.info(
            "request %s user=%s operation=%s status=%s outcome=%s duration_ms=%.1f",
            self.request_id,
            self.user,
            self.operation,
            "-" if status is None else status,
            outcome,
            ms,
            extra={"fields": fields},
        )
