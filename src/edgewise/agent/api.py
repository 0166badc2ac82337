"""The local HTTP API: predictions, health and metrics for processes on the same host.

Bound to 127.0.0.1 by default (the device's own apps call it; operators reach
``/metrics`` through their scraper on the host). Standard library only:
``ThreadingHTTPServer`` with daemon threads, JSON in and out. Every error is
``{"error": "..."}`` with a status that says whose fault it was: 400 for the
caller's input, 503 while no model is installed, 500 for the agent's own.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np

from .runtime import InferenceError, InputError, InputSpec

if TYPE_CHECKING:
    from .service import Agent

log = logging.getLogger("edgewise.agent.api")

MAX_BODY = 16 * 2**20  # a predict request larger than this is a mistake, not a workload

_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers", "U": "strings", "S": "strings", "O": "mixed values"}


def json_to_array(name: str, value: Any, spec: InputSpec | None) -> np.ndarray:
    """Turn a JSON value into the ndarray the input expects; InputError when it cannot be one."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"input {name!r}: not a rectangular array ({exc})") from None
    if spec is None:
        return arr  # unknown input: LoadedModel.predict names it
    kind = arr.dtype.kind
    if spec.is_string:
        if kind not in "U":
            raise InputError(f"input {name!r}: expected strings, got {_KIND_NAMES.get(kind, arr.dtype.name)}")
        return arr.astype(object)
    want = spec.dtype.kind
    ok = (want == "f" and kind in "iuf") or (want in "iu" and kind in "iu") or (want == "b" and kind == "b")
    if not ok:
        got = "ragged nested lists or mixed values" if kind == "O" else _KIND_NAMES.get(kind, arr.dtype.name)
        raise InputError(f"input {name!r}: expected {_KIND_NAMES.get(want, 'values')} for dtype {spec.dtype_name}, got {got}")
    return arr.astype(spec.dtype, copy=False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class LocalApi:
    """Serves an :class:`~edgewise.agent.service.Agent` over HTTP on a background thread."""

    def __init__(self, agent: "Agent", host: str = "127.0.0.1", port: int = 0) -> None:
        self.agent = agent
        handler = type("Handler", (_Handler,), {"agent": agent})
        self._server = _Server((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="edgewise-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    agent: "Agent"
    protocol_version = "HTTP/1.1"
    server_version = "edgewise-agent"
    timeout = 30  # idle keep-alive connections give their thread back

    # -- plumbing -------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- routes ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/v1/health":
                self._json(200, self.agent.health())
            elif path == "/metrics":
                body, ctype = self.agent.monitor.exposition()
                self._send(200, body, ctype)
            elif path == "/v1/models":
                m = self.agent.current_model
                self._json(200, {"primary": {"model": m.name, "version": m.version} if m is not None else None,
                                 "hosted": [h.model_dump(mode="json") for h in self.agent.hosting.hosted()]})
            elif path == "/v1/predict":
                self._error(405, "use POST /v1/predict with a JSON body {\"inputs\": {name: array}}")
            else:
                self._error(404, f"no route {path}; try POST /v1/predict, POST /v1/models/{{name}}/predict, GET /v1/models, GET /v1/health, GET /metrics")
        except Exception as exc:
            log.exception("GET %s failed", path)
            self._error(500, f"internal error: {type(exc).__name__}: {exc}")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/v1/adapt":
            try:
                self._adapt()
            except Exception as exc:
                log.exception("POST /v1/adapt failed")
                self._error(500, f"internal error: {type(exc).__name__}: {exc}")
            return
        if path.startswith("/v1/models/") and path.endswith("/predict"):
            try:
                self._predict_placed(path[len("/v1/models/"):-len("/predict")])
            except Exception as exc:
                log.exception("POST %s failed", path)
                self._error(500, f"internal error: {type(exc).__name__}: {exc}")
            return
        if path != "/v1/predict":
            # Drain the body so the keep-alive connection stays in sync.
            self._read_body()
            self._error(404, f"no route POST {path}; predictions are POST /v1/predict (placed models: POST /v1/models/{{name}}/predict)")
            return
        try:
            self._predict()
        except Exception as exc:
            log.exception("POST /v1/predict failed")
            self._error(500, f"internal error: {type(exc).__name__}: {exc}")

    def _adapt(self) -> None:
        """POST /v1/adapt ``{"method": "auto"|"adabn"|"coral"}`` (body optional): adapt the live model to the recent
        inputs (agent.adapt). 200 with the result when committed, 409 when not (too few samples, rolled back), 503 without a model."""
        body = self._read_body() or b""
        method: str | None = None  # the agent's configured adapt_method
        if body.strip():
            try:
                obj = json.loads(body)
                method = obj.get("method") if isinstance(obj, dict) else "?"
            except ValueError:
                method = "?"
            if method not in (None, "auto", "adabn", "coral"):
                self._error(400, 'body must be JSON {"method": "auto" | "adabn" | "coral"} (or empty for the configured adapt_method)')
                return
        if self.agent.current_model is None:
            self._error(503, "no model installed yet; nothing to adapt")
            return
        result = self.agent.adapt(method=method, trigger="api")
        self._json(200 if result.result == "ok" else 409, result.to_json())

    def _read_body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return None
        n = int(length)
        if n > MAX_BODY:
            return None
        return self.rfile.read(n)

    def _predict(self) -> None:
        agent = self.agent
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(411, "send the JSON body with a Content-Length header")
            return
        if int(length) > MAX_BODY:
            self.close_connection = True
            self._error(413, f"body of {length} bytes exceeds the {MAX_BODY}-byte limit; send smaller batches")
            return
        body = self.rfile.read(int(length))
        model = agent.current_model
        if model is None:
            self._error(503, "no model installed yet; the agent is waiting for its desired state (or run `edgewise agent install`)")
            return
        try:
            inputs = _parse_inputs(body, model)
            arrays = {name: json_to_array(name, value, model.inputs.get(name)) for name, value in inputs.items()}
        except InputError as exc:
            agent.monitor.count_error()
            self._error(400, str(exc))
            return
        t0 = time.perf_counter_ns()
        try:
            outputs = agent.predict_on(model, arrays)
        except InputError as exc:
            self._error(400, str(exc))
            return
        except InferenceError as exc:
            self._error(500, str(exc))
            return
        latency_ms = (time.perf_counter_ns() - t0) / 1e6
        self._json(
            200,
            {
                "model": model.name,
                "version": model.version,
                "outputs": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in outputs.items()},
                "latency_ms": round(latency_ms, 4),
            },
        )

    def _predict_placed(self, name: str) -> None:
        """POST /v1/models/{name}/predict: a model placed on this device (agent.hosting), served by its own worker
        process; the primary model answers under its own name too. Same body and answer as /v1/predict."""
        from urllib.parse import unquote

        from .hosting import PlacementError

        name = unquote(name)
        agent = self.agent
        body = self._read_body()
        if body is None:
            self.close_connection = True
            self._error(411, f"send the JSON body with a Content-Length header (at most {MAX_BODY} bytes)")
            return
        primary = agent.current_model
        if agent.hosting.get(name) is None and primary is not None and primary.name == name:
            try:
                inputs = _parse_inputs(body, primary)
                arrays = {k: json_to_array(k, v, primary.inputs.get(k)) for k, v in inputs.items()}
                t0 = time.perf_counter_ns()
                outputs = agent.predict_on(primary, arrays)
            except InputError as exc:
                self._error(400, str(exc))
                return
            except InferenceError as exc:
                self._error(500, str(exc))
                return
            answer = {"model": primary.name, "version": primary.version, "outputs": outputs,
                      "latency_ms": round((time.perf_counter_ns() - t0) / 1e6, 4)}
        else:
            try:
                obj = json.loads(body)
                inputs = obj.get("inputs", obj) if isinstance(obj, dict) else None
                if not isinstance(inputs, dict) or not inputs:
                    pm = agent.hosting.get(name)
                    first = ((pm.info.get("inputs") if pm is not None else None) or ["x"])[0]
                    raise InputError(f'body must be a JSON object like {{"inputs": {{"{first}": [[...]]}}}}')
                answer = agent.hosting.predict(name, inputs, json_values=True)
            except (ValueError, UnicodeDecodeError) as exc:  # InputError is a ValueError
                self._error(400, str(exc) if isinstance(exc, InputError) else f"body is not valid JSON ({exc})")
                return
            except PlacementError as exc:
                self._error(exc.status, str(exc))
                return
        outputs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in answer["outputs"].items()}
        self._json(200, {**answer, "outputs": outputs})


def _parse_inputs(body: bytes, model: Any) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"body is not valid JSON ({exc}); send {{\"inputs\": {{\"{model.input_names[0]}\": [[...]]}}}}") from None
    if not isinstance(obj, dict):
        raise InputError(f"body must be a JSON object like {{\"inputs\": {{\"{model.input_names[0]}\": [[...]]}}}}, got {type(obj).__name__}")
    if isinstance(obj.get("inputs"), dict) and "inputs" not in model.inputs:
        obj = obj["inputs"]
    if not obj:
        raise InputError(f"no inputs given; {model.name} {model.version} takes {list(model.input_names)}")
    return obj
