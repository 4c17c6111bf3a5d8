"""The web console of the HTTP front end: `GET /console`, a page for people.

The page is static (`console_static/`: one HTML file, one hand-written script, one style
sheet; curves are plain SVG, no third-party code). It asks for an API key once, keeps it in the
browser's `sessionStorage` (gone when the tab closes, never in a URL, a cookie or the server's
logs) and sends it as `X-API-Key` to the same authenticated JSON routes the SDK uses: training
runs, checkpoints (publish, unpublish, TTL, delete, `external_weights_urls` downloads),
sessions and samplers. So the console sees exactly what the key's user may see through the
API, and nothing of another user's.

Two routes are the console's own (`handlers`, under `/api/v1`, authenticated like every
other): a run's loss and metric history (`ServiceCore.metric_history`, points recorded as each
forward_backward, forward and optim_step finishes), and the operator's view of the server's
load (queues, throughput, memory) for administrators' keys only (`tinker-jax keys create
--admin`), read from the server's metrics (`service.metrics`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tinker_jax.service import http_codec as codec
from tinker_jax.service.core import ServiceCore
from tinker_jax.service.errors import NotFound
from tinker_jax.service.store import MAX_METRIC_POINTS, MetricPointRecord

if TYPE_CHECKING:
    from tinker_jax.service.http_server import Call
    from tinker_jax.service.metrics import Metrics

# The console's files, by the name the page asks for, with their content type.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
# The page runs only its own script and style sheet and talks only to this server; it is never
# framed, and the browser sends no referrer (the page's address holds run ids).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# Samples of the server's metrics (`service.metrics`) the operator view reports per base
# model, by the field it reports them as.
_MODEL_TOTALS = {
    "tinker_jax_active_runs": "active_runs",
    "tinker_jax_active_samplers": "active_samplers",
    "tinker_jax_trained_tokens_total": "trained_tokens",
    "tinker_jax_sampled_tokens_total": "sampled_tokens",
    "tinker_jax_operation_failures_total": "failed_operations",
}
_OPERATION_TIMES = {
    "tinker_jax_operation_seconds_count": "finished",
    "tinker_jax_operation_seconds_sum": "seconds",
}
_DEVICE_MEMORY = {
    "tinker_jax_device_memory_bytes_in_use": "bytes_in_use",
    "tinker_jax_device_memory_bytes_limit": "bytes_limit",
}


class ConsoleRoutes:
    """The console's page (`pages`) and its JSON routes (`handlers`) over a service core and
    the server's metrics (None: a server without metrics, whose operator view is 404)."""

    def __init__(self, core: ServiceCore, metrics: Metrics | None):
        self.core = core
        self.metrics = metrics
        folder = resources.files("tinker_jax.service") / "console_static"
        self._files = {name: (folder / name).read_bytes() for name in STATIC_FILES}

    def pages(self) -> list[Route]:
        """The page and its files: no API key (the page asks for one)."""
        return [
            Route("/console", self._page, methods=["GET"]),
            Route("/console/static/{name}", self._static, methods=["GET"]),
        ]

    def handlers(self) -> list[tuple[str, str, Callable[[Call], Any]]]:
        """(path under /api/v1, HTTP method, handler) of each JSON route."""
        return [
            ("/training_runs/{run_id}/metric_history", "GET", self.metric_history),
            ("/console/load", "GET", self.load),
        ]

    async def _page(self, request: Request) -> Response:
        return self._file("index.html")

    async def _static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return Response(f"no console file {name!r:.80}", 404, media_type="text/plain")
        return self._file(name)

    def _file(self, name: str) -> Response:
        return Response(self._files[name], media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)

    def metric_history(self, call: Call) -> dict[str, Any]:
        """The caller's run's points, oldest first: `{"training_run_id", "max_points",
        "points": [{"seq", "step", "kind", "time", "metrics": {name: value}}]}`, a value that
        is not finite (a diverged loss) as null, which every JSON reader takes."""
        run_id = call.path("run_id")
        points = self.core.metric_history(call.user, run_id)
        return {
            "training_run_id": run_id,
            "max_points": MAX_METRIC_POINTS,
            "points": [_point_json(p) for p in points],
        }

    def load(self, call: Call) -> dict[str, Any]:
        """The server's load for an administrator's key (403 for any other): see
        `operator_load`. 404 on a server that keeps no metrics."""
        self.core.check_admin(call.api_key)
        if self.metrics is None:
            raise NotFound("this server keeps no metrics, so it has no operator view")
        return operator_load(self.metrics)


def _point_json(point: MetricPointRecord) -> dict[str, Any]:
    return {
        "seq": point.seq,
        "step": point.step,
        "kind": point.kind,
        "time": codec.timestamp(point.time),
        "metrics": {k: v if math.isfinite(v) else None for k, v in point.metrics.items()},
    }


def operator_load(metrics: Metrics) -> dict[str, Any]:
    """A snapshot of the server's load from its metrics registry, which names no user:

    `{"time": unix seconds, "models": {base_model: {"queues": {operation: depth},
    "operations": {operation: {"finished", "seconds"}}, "active_runs", "active_samplers",
    "trained_tokens", "sampled_tokens", "failed_operations"}}, "devices": {device:
    {"bytes_in_use", "bytes_limit"}}, "compilations": {source: count}, "process_rss_bytes"}`.

    Token and operation counts are totals since the server started; throughput is their change
    between two snapshots over the change of `time` (the console polls). Devices whose backend
    reports no memory (JAX on CPU) are absent; the process's resident memory stands in for them.
    """
    models: dict[str, dict[str, Any]] = {}
    devices: dict[str, dict[str, float]] = {}
    compilations: dict[str, float] = {}

    def model(name: str) -> dict[str, Any]:
        return models.setdefault(
            name,
            {"queues": {}, "operations": {}, **dict.fromkeys(_MODEL_TOTALS.values(), 0)},
        )

    for family in metrics.registry.collect():
        for s in family.samples:
            labels = s.labels
            if s.name == "tinker_jax_queue_depth":
                model(labels["base_model"])["queues"][labels["operation"]] = s.value
            elif s.name in _MODEL_TOTALS:
                model(labels["base_model"])[_MODEL_TOTALS[s.name]] += s.value
            elif s.name in _OPERATION_TIMES:
                ops = model(labels["base_model"])["operations"]
                op = ops.setdefault(labels["operation"], {"finished": 0, "seconds": 0.0})
                op[_OPERATION_TIMES[s.name]] = s.value
            elif s.name in _DEVICE_MEMORY:
                devices.setdefault(labels["device"], {})[_DEVICE_MEMORY[s.name]] = s.value
            elif s.name == "tinker_jax_xla_compilations_total":
                compilations[labels["source"]] = s.value
    return {
        "time": time.time(),
        "models": models,
        "devices": devices,
        "compilations": compilations,
        "process_rss_bytes": _resident_bytes(),
    }


def _resident_bytes() -> int | None:
    """This process's resident memory (Linux's /proc), None where the system has no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None
