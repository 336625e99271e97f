"""Serve a calibrated cascade over HTTP with LitServe: dynamic batching, a JSON predict endpoint, live stats.

    from lit_cascades.cascade import Cascade
    from lit_cascades.serving import serve

    serve(Cascade.load("deploy/digits"), port=8000, max_batch_size=16, batch_timeout=0.005)

Endpoints (``docs/serving.md`` has the full schema):

* ``POST /predict`` ``{"inputs": [row, ...]}`` -> ``{"outputs": [{"prediction", "deferred", "score", "calls",
  "seconds"}, ...]}``, one output per row, in order. A row is one model input, nested to the model's input shape
  (``[1, 8, 8]``) or flat (64 numbers).
* ``GET /stats``: requests, rows, the live deferral rate next to the calibrated target and bound, large-model
  calls, latency percentiles, batch sizes.
* ``GET /health`` (LitServe's): 200 once the inference workers are ready.

How the pieces run. LitServe starts *inference workers* (spawned processes that hold the models and run
``LitAPI.predict`` on dynamic batches of up to ``max_batch_size`` requests, waiting at most ``batch_timeout``
seconds to fill one) and *API servers* (uvicorn processes forked from the main one). A request is checked in the
API server by :class:`_Guard`, an ASGI middleware, before it is queued: a bad request is answered there (4xx
with a message) and never joins a batch, so it cannot fail the good requests batched with it (LitServe fails a
whole batch when one item's ``decode_request`` raises). Statistics are written where they are observed (rows
and deferrals by the inference workers, latency and status codes by the API servers) into one block of shared
memory (:class:`ServingStats`), which ``/stats`` reads from any API server.

Tasks plug in through an :class:`Adapter` (parse a request, run a batch, say which items were deferred);
:class:`ClassificationAdapter` serves :class:`lit_cascades.cascade.Cascade`. A generation adapter (prompts ->
texts) implements the same four methods around a cascade's ``generate(prompts)``.

LitServe, FastAPI and uvicorn are imported when a server is built, not when this module is imported.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: latencies kept for the percentiles of ``/stats`` (the most recent ones)
LATENCY_WINDOW = 100_000


class BadRequest(ValueError):
    """A request the server refuses: answered with ``status`` and ``{"detail": message}``.

    Args:
        message: what is wrong, naming the field (``inputs[3]: expected 64 numbers ...``).
        status: the HTTP status (400 not JSON, 413 too large, 422 valid JSON that does not fit the schema).
    """

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def request_inputs(payload: Any, limit: int, item: str = "row", items: str = "rows", listed: str = "rows") -> list:
    """The ``"inputs"`` list of a request body ``{"inputs": [item, ...]}``, checked to hold 1 to ``limit`` entries.

    ``item``, ``items`` and ``listed`` name the entries in the messages (``"prompt"``, ``"prompts"``,
    ``"prompt strings"`` for an LM server). The entries themselves are the caller's to check.

    Raises:
        BadRequest: not such an object (422), other keys (422), ``inputs`` not a list or empty (422), more than
            ``limit`` entries (413).
    """
    if not isinstance(payload, dict) or "inputs" not in payload:
        got = f"an object with keys {sorted(payload)}" if isinstance(payload, dict) else type(payload).__name__
        raise BadRequest(f'request: expected a JSON object {{"inputs": [{item}, ...]}}; got {got}')
    extra = sorted(set(payload) - {"inputs"})
    if extra:
        raise BadRequest(f"request: unknown keys {extra}; expected only 'inputs'")
    inputs = payload["inputs"]
    if not isinstance(inputs, list):
        raise BadRequest(f"inputs: expected a list of {listed}; got {type(inputs).__name__}")
    if not inputs:
        raise BadRequest(f"inputs: empty; expected 1 to {limit} {items}")
    if len(inputs) > limit:
        raise BadRequest(f"inputs: {len(inputs)} {items}; this server takes at most {limit} per request", status=413)
    return inputs


@dataclass
class BatchResult:
    """What :meth:`Adapter.run` returns for the requests of one dynamic batch.

    Attributes:
        responses: one JSON-able response body per request, in order.
        deferred: one flag per item (row, prompt) of all requests, in order: True where the large model answered.
        large_calls: calls of the large model spent on the batch.
    """

    responses: list[dict[str, Any]]
    deferred: list[bool]
    large_calls: int


@runtime_checkable
class Adapter(Protocol):
    """What the server needs from a cascade of some task.

    ``parse`` runs in the API server (to refuse bad requests before they are batched) and again in the inference
    worker (to decode them); ``setup`` and ``run`` run in the inference worker. The adapter is pickled into the
    worker processes, so it holds the cascade (or a path to it) and nothing tied to a process.
    """

    task: str

    def parse(self, payload: Any) -> Any:
        """A request's parsed JSON -> the request's items, decoded (raise :class:`BadRequest` when bad)."""
        ...

    def setup(self, device: str) -> None:
        """Load or move the models to ``device`` (``"cpu"``, ``"cuda:0"``)."""
        ...

    def run(self, requests: list[Any]) -> BatchResult:
        """Answer all requests of one batch at once (each as returned by :meth:`parse`)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Static facts shown by ``/stats``: the task, the threshold, the calibration (target, bound, method)."""
        ...


# --------------------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------------------
def _input_shape(cascade: Any) -> tuple[int, ...]:
    spec = cascade.small_spec or {}
    shape = spec.get("in_shape")
    if not shape:
        raise ValueError("cascade: its small_spec has no 'in_shape', so requests cannot be checked; pass in_shape=")
    return tuple(int(v) for v in shape)


class ClassificationAdapter:
    """Serves a :class:`lit_cascades.cascade.Cascade`.

    Request: ``{"inputs": [row, ...]}`` with 1 to ``max_rows`` rows; a row is one input, a nested list of shape
    ``in_shape`` or a flat list of ``prod(in_shape)`` numbers (finite; ints are read as floats).
    Response: ``{"outputs": [{"prediction": int, "deferred": bool, "score": float, "calls": int,
    "seconds": float}, ...]}``, the fields of :class:`lit_cascades.cascade.CascadeOutput` for each row.
    All rows of a dynamic batch go through one :meth:`Cascade.predict` call, so the large model runs once per
    batch on the deferred rows of every request in it; ``seconds`` is that call's time shared as in ``predict``.

    Args:
        cascade: a calibrated cascade, or the directory it was saved to (loaded in each inference worker).
        max_rows: the most rows one request may carry (more: 413).
        in_shape: the input shape of one row; default: the small model's spec (``small_spec["in_shape"]``).
    """

    task = "classification"

    def __init__(self, cascade: Any, max_rows: int = 256, in_shape: Sequence[int] | None = None) -> None:
        from lit_cascades.cascade import Cascade

        if isinstance(cascade, str | Path):
            cascade = Cascade.load(cascade)
        if not isinstance(cascade, Cascade):
            raise TypeError(f"cascade: expected a Cascade or the directory of a saved one; got {type(cascade).__name__}")
        if cascade.threshold is None:
            raise ValueError("cascade: not calibrated (threshold is None); call calibrate() before serving")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows: expected an integer >= 1; got {max_rows!r}")
        self.cascade = cascade
        self.max_rows = max_rows
        self.in_shape = tuple(int(v) for v in in_shape) if in_shape is not None else _input_shape(cascade)
        self.row_size = math.prod(self.in_shape)

    def parse(self, payload: Any) -> np.ndarray:
        """``{"inputs": [...]}`` -> a float32 array ``[B, *in_shape]``; :class:`BadRequest` naming the bad part."""
        rows = request_inputs(payload, self.max_rows)
        flat_ok, nested = (self.row_size,), self.in_shape
        out = np.empty((len(rows), self.row_size), dtype=np.float32)
        for i, row in enumerate(rows):
            _check_numbers(row, f"inputs[{i}]")
            try:
                arr = np.asarray(row, dtype=np.float64)
            except (ValueError, OverflowError) as err:  # ragged nesting, ints beyond float range
                raise BadRequest(f"inputs[{i}]: expected {self.row_size} numbers, flat or nested as {list(nested)}; "
                                 f"{err}") from None
            if arr.shape not in (flat_ok, nested):
                raise BadRequest(f"inputs[{i}]: expected {self.row_size} numbers, flat or nested as {list(nested)}; "
                                 f"got shape {list(arr.shape)}")
            with np.errstate(over="ignore"):  # beyond float32: inf, refused just below
                arr32 = arr.astype(np.float32).reshape(-1)
            if not np.isfinite(arr32).all():
                j = int(np.flatnonzero(~np.isfinite(arr32))[0])
                raise BadRequest(f"inputs[{i}]: expected finite numbers (float32 range); value {j} is {arr.reshape(-1)[j]}")
            out[i] = arr32
        return out.reshape(len(rows), *self.in_shape)

    def setup(self, device: str) -> None:
        self.cascade.to(device)

    def run(self, requests: list[np.ndarray]) -> BatchResult:
        import torch

        sizes = [r.shape[0] for r in requests]
        x = torch.from_numpy(np.concatenate(requests))
        out = self.cascade.predict(x)
        n_def = int(out.deferred.sum())
        step = self.cascade.batch_size or max(n_def, 1)
        rows = [{"prediction": p, "deferred": d, "score": s, "calls": c, "seconds": t}
                for p, d, s, c, t in zip(out.predictions.tolist(), out.deferred.tolist(), out.scores.tolist(),
                                         out.calls.tolist(), out.seconds.tolist())]
        responses, start = [], 0
        for n in sizes:
            responses.append({"outputs": rows[start: start + n]})
            start += n
        return BatchResult(responses, out.deferred.tolist(), math.ceil(n_def / step))

    def describe(self) -> dict[str, Any]:
        rep = self.cascade.calibration
        calibration = None
        if rep is not None:
            calibration = {k: getattr(rep, k) for k in ("method", "n", "target_rate", "confidence", "rate", "bound",
                                                         "guarantee", "cascade_quality", "large_quality")}
        return {"task": self.task, "threshold": _finite_or_none(self.cascade.threshold),
                "score": self.cascade.score if isinstance(self.cascade.score, str) else "callable",
                "in_shape": list(self.in_shape), "max_rows": self.max_rows, "calibration": calibration,
                "source": self.cascade.source}


def _finite_or_none(v: float | None) -> float | str | None:
    return v if v is None or math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _check_numbers(value: Any, where: str) -> None:
    """Every leaf of a nested list is a JSON number (``true``/``false`` and strings are not)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif type(v) not in (int, float):  # bool is a subclass of int: excluded on purpose
            raise BadRequest(f"{where}: expected numbers; found {json.dumps(v)[:40]} ({type(v).__name__})")


# --------------------------------------------------------------------------------------------------------
# statistics shared by all server processes
# --------------------------------------------------------------------------------------------------------
_COUNTERS = ("requests", "ok", "client_errors", "server_errors", "rows", "deferred_rows", "large_model_calls",
             "batches", "batched_requests", "latency_seen")


class ServingStats:
    """Counters and a latency window in shared memory, written by every server process, read by ``/stats``.

    Created before the server starts; forked API servers inherit the memory and spawned inference workers get it
    with the pickled API (``multiprocessing`` shares it only at process start, which is when LitServe passes
    it). Updates take one lock, a few microseconds.
    """

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        ctx = mp.get_context("spawn")
        self.window = int(window)
        self._lock = ctx.Lock()
        self._counts = ctx.RawArray("d", len(_COUNTERS))
        self._latency = ctx.RawArray("d", self.window)
        self._started = time.time()

    def _add(self, **inc: float) -> None:
        with self._lock:
            for k, v in inc.items():
                self._counts[_COUNTERS.index(k)] += v

    def record_request(self, status: int, seconds: float) -> None:
        """One answered request (API server side): its HTTP status and its latency (ok requests only)."""
        kind = "ok" if status < 400 else "client_errors" if status < 500 else "server_errors"
        with self._lock:
            self._counts[_COUNTERS.index("requests")] += 1
            self._counts[_COUNTERS.index(kind)] += 1
            if status < 400:
                i = _COUNTERS.index("latency_seen")
                self._latency[int(self._counts[i]) % self.window] = seconds
                self._counts[i] += 1

    def record_batch(self, requests: int, deferred: Sequence[bool], large_calls: int) -> None:
        """One predicted batch (inference worker side)."""
        self._add(batches=1, batched_requests=requests, rows=len(deferred), deferred_rows=sum(map(bool, deferred)),
                  large_model_calls=large_calls)

    def snapshot(self) -> dict[str, Any]:
        """Counters, the live deferral rate with its 95% Clopper–Pearson interval, latency percentiles (ms)."""
        with self._lock:
            counts = {k: int(v) for k, v in zip(_COUNTERS, self._counts)}
            seen = counts.pop("latency_seen")
            lat = np.frombuffer(self._latency, dtype=np.float64)[: min(seen, self.window)].copy()
        rows, dfr = counts["rows"], counts["deferred_rows"]
        out: dict[str, Any] = {**counts, "deferral_rate": dfr / rows if rows else None,
                               "deferral_rate_ci95": clopper_pearson_interval(dfr, rows) if rows else None,
                               "mean_batch_requests": counts["batched_requests"] / counts["batches"]
                               if counts["batches"] else None,
                               "mean_batch_rows": rows / counts["batches"] if counts["batches"] else None,
                               "uptime_s": time.time() - self._started}
        out["latency_ms"] = {"count": int(lat.size), "window": self.window, **{
            f"p{q}": float(np.percentile(lat, q) * 1e3) if lat.size else None for q in (50, 90, 99)}}
        return out


def clopper_pearson_interval(k: int, n: int, level: float = 0.95) -> list[float]:
    """Two-sided Clopper–Pearson interval ``[lo, hi]`` for ``k`` successes out of ``n`` trials."""
    from scipy.stats import beta

    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return [lo, hi]


def stats_report(stats: ServingStats, adapter: Adapter) -> dict[str, Any]:
    """The ``/stats`` body: :meth:`ServingStats.snapshot`, the adapter's static facts, and ``above_bound``: True
    when the live 95% interval lies wholly above the calibrated bound (evidence that served traffic defers more
    than calibrated: a distribution shift)."""
    snap = stats.snapshot()
    info = adapter.describe()
    cal = info.get("calibration") or {}
    bound = cal.get("bound") if cal.get("bound") is not None else cal.get("target_rate")
    ci = snap["deferral_rate_ci95"]
    snap["above_bound"] = bool(ci is not None and bound is not None and ci[0] > bound)
    return {**info, **snap}


# --------------------------------------------------------------------------------------------------------
# the LitServe parts
# --------------------------------------------------------------------------------------------------------
class _Guard:
    """ASGI middleware in each API server: refuses bad predict requests before they are queued and records
    every predict request's status and latency in :class:`ServingStats`."""

    def __init__(self, app: Any, adapter: Adapter, stats: ServingStats, api_path: str, max_body: int) -> None:
        self.app, self.adapter, self.stats, self.api_path, self.max_body = app, adapter, stats, api_path, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.api_path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        error: BadRequest | None = None
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                error = BadRequest(f"request: body larger than {self.max_body} bytes", status=413)
                break
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        if error is None:
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as err:
                error = BadRequest(f"request: the body is not valid JSON ({err})", status=400)
        if error is None:
            try:
                self.adapter.parse(payload)
            except BadRequest as err:
                error = err
        if error is not None:
            await _send_json(send, error.status, {"detail": error.message})
            self.stats.record_request(error.status, time.perf_counter() - start)
            return

        status = [500]
        replayed = [False]

        async def replay() -> dict:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, replay, send_status)
        finally:
            self.stats.record_request(status[0], time.perf_counter() - start)


async def _send_json(send: Any, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _lit_api_class() -> type:
    """``CascadeAPI``: defined on first use so that importing this module does not import LitServe."""
    global _CascadeAPI
    if _CascadeAPI is not None:
        return _CascadeAPI
    import litserve as ls
    from fastapi import HTTPException

    class CascadeAPI(ls.LitAPI):
        """A LitAPI around an :class:`Adapter`: decode with ``parse``, one ``run`` per dynamic batch."""

        def __init__(self, adapter: Adapter, stats: ServingStats, max_batch_size: int = 16,
                     batch_timeout: float = 0.005, api_path: str = "/predict") -> None:
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=api_path)
            self.adapter, self.stats = adapter, stats

        def setup(self, device: str) -> None:
            self.adapter.setup(device)

        # no annotations on `request` and on encode_response's return: LitServe reads them as the FastAPI request
        # and response types (unannotated: the JSON body in, a JSON body out)
        def decode_request(self, request):  # type: ignore[no-untyped-def]
            try:
                return self.adapter.parse(request)
            except BadRequest as err:  # normally refused earlier by _Guard; fails the batch if it gets here
                raise HTTPException(err.status, detail=err.message) from None

        def batch(self, inputs: list[Any]) -> list[Any]:
            return list(inputs)

        def predict(self, x: Any) -> Any:
            single = self.max_batch_size == 1  # LitServe's unbatched loop passes one decoded request
            result = self.adapter.run([x] if single else x)
            self.stats.record_batch(1 if single else len(x), result.deferred, result.large_calls)
            return result.responses[0] if single else result.responses

        def unbatch(self, output: list[Any]) -> list[Any]:
            return output

        def encode_response(self, output):  # type: ignore[no-untyped-def]
            return output

    # pickled into spawned workers by reference: it must be reachable as lit_cascades.serving.CascadeAPI
    CascadeAPI.__module__, CascadeAPI.__qualname__ = __name__, "CascadeAPI"
    globals()["CascadeAPI"] = CascadeAPI
    _CascadeAPI = CascadeAPI
    return CascadeAPI


_CascadeAPI: type | None = None


def __getattr__(name: str) -> Any:  # lit_cascades.serving.CascadeAPI, built (and LitServe imported) on first use
    if name == "CascadeAPI":
        return _lit_api_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_adapter(obj: Any, max_rows: int = 256) -> Adapter:
    """The adapter serving ``obj``: an :class:`Adapter` as is; an object with ``serve_adapter()`` (a generation
    cascade) through it; a :class:`~lit_cascades.cascade.Cascade` through :class:`ClassificationAdapter`; a
    directory through :meth:`Cascade.load <lit_cascades.cascade.Cascade.load>` first."""
    if isinstance(obj, Adapter):
        return obj
    if isinstance(obj, str | Path):
        from lit_cascades.cascade import Cascade

        obj = Cascade.load(obj)
    if callable(getattr(obj, "serve_adapter", None)):
        return obj.serve_adapter()
    return ClassificationAdapter(obj, max_rows=max_rows)


def build_server(
    cascade_or_adapter: Any,
    *,
    max_batch_size: int = 16,
    batch_timeout: float = 0.005,
    max_rows: int = 256,
    max_body: int = 8 << 20,
    workers_per_device: int = 1,
    accelerator: str = "auto",
    timeout: float = 30.0,
    api_path: str = "/predict",
) -> tuple[Any, ServingStats]:
    """A ``litserve.LitServer`` for a cascade (or any :class:`Adapter`) with ``/stats``; returns
    ``(server, stats)``. Start it with ``server.run(host="127.0.0.1", port=..., generate_client_file=False)``
    (or use :func:`serve`).

    Args:
        cascade_or_adapter: a calibrated :class:`~lit_cascades.cascade.Cascade`, the directory of a saved one,
            an object with ``serve_adapter()``, or an :class:`Adapter` (see :func:`make_adapter`).
        max_batch_size: the most requests LitServe puts in one dynamic batch.
        batch_timeout: the longest an inference worker waits (seconds) to fill a batch.
        max_rows: the most rows one classification request may carry (413 above).
        max_body: the largest request body in bytes (413 above).
        workers_per_device: inference worker processes per device.
        accelerator: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        timeout: seconds a request may wait for a worker before a 504.
    """
    for name, v, lo in (("max_batch_size", max_batch_size, 1), ("max_body", max_body, 1),
                        ("workers_per_device", workers_per_device, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an integer >= {lo}; got {v!r}")
    if isinstance(batch_timeout, bool) or not isinstance(batch_timeout, int | float) or not batch_timeout >= 0:
        raise ValueError(f"batch_timeout: expected seconds >= 0; got {batch_timeout!r}")
    adapter = make_adapter(cascade_or_adapter, max_rows=max_rows)
    import litserve as ls
    from fastapi.responses import JSONResponse

    stats = ServingStats()
    api = _lit_api_class()(adapter, stats, max_batch_size=max_batch_size, batch_timeout=float(batch_timeout),
                           api_path=api_path)
    server = ls.LitServer(api, accelerator=accelerator, workers_per_device=workers_per_device, timeout=timeout,
                          middlewares=[(_Guard, {"adapter": adapter, "stats": stats, "api_path": api_path,
                                                 "max_body": max_body})])

    async def stats_endpoint() -> JSONResponse:
        return JSONResponse(stats_report(stats, adapter))

    server.app.add_api_route("/stats", stats_endpoint, methods=["GET"])
    return server, stats


def serve(cascade_or_adapter: Any, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
          num_api_servers: int | None = None, **kwargs: Any) -> None:
    """Build the server (:func:`build_server`, ``kwargs`` go there) and serve until interrupted (Ctrl+C or
    SIGTERM: LitServe stops its workers). Binds ``127.0.0.1`` unless ``host`` says otherwise."""
    import os
    import signal

    server, _ = build_server(cascade_or_adapter, **kwargs)
    main_pid = os.getpid()

    def _interrupt(signum: int, frame: Any) -> None:  # SIGTERM -> the same clean shutdown as Ctrl+C
        if os.getpid() != main_pid:  # a forked API server inherited this handler: die as SIGTERM says
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(host=host, port=port, log_level=log_level, num_api_servers=num_api_servers,
                   generate_client_file=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
