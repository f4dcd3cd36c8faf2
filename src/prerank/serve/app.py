"""HTTP service around a :class:`~prerank.serve.scorer.Scorer` (FastAPI, run by uvicorn).

Endpoints:
    ``POST /score``    ``{"user": {...}, "candidates": [ids], "k": 10, "cross": {name: [values]}}``
                       -> ``{"ids": [...], "scores": [...], "skipped": [...]}`` (scores are logits)
    ``GET /health``    ``{"status": "ok"}``: liveness (the process answers)
    ``GET /ready``     ``{"status": "ready", ...}``: readiness; the app exists only once its artifact is loaded,
                       every file checked against the manifest's sha256, and a warm-up request scored
    ``GET /metadata``  model name, weights sha256, cache size, limits and the schema

With a bearer token (``create_app(..., token=...)``, ``prerank serve --token`` or ``PRERANK_TOKEN``) every endpoint
but ``/health`` and ``/ready`` answers 401 to a request without ``Authorization: Bearer <token>``; ``prerank serve``
requires one to bind beyond loopback. On SIGTERM uvicorn stops accepting connections and finishes the requests in
flight before it exits.

Errors are JSON ``{"detail": [{"field": "user.age", "message": "..."}]}``: 422 for a malformed request
(structure checked by pydantic, values by the scorer), 413 for a body over ``max_body_bytes`` or more
candidates than the scorer's limit. One request scores at a time per process (a lock), so a request's
latency is what ``prerank bench`` measures and torch's intra-op threads are not shared between requests;
run more processes to use more cores.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prerank.serve.scorer import RequestTooLarge, Scorer, ScoringError

DEFAULT_MAX_BODY_BYTES = 1 << 20


class ScoreRequest(BaseModel):
    """Body of ``POST /score``; feature values are checked against the schema by the scorer."""

    model_config = ConfigDict(extra="forbid")

    user: dict[str, Any]
    candidates: list[StrictInt]
    k: StrictInt | None = None
    cross: dict[str, list[Any]] | None = None


class ScoreResponse(BaseModel):
    ids: list[int]
    scores: list[float]
    skipped: list[int]


def _error(status: int, errors: list[dict[str, str]]) -> JSONResponse:
    return JSONResponse({"detail": errors}, status_code=status)


class BodyTooLarge(HTTPException):
    """Raised while reading a body over the limit (an HTTPException, so FastAPI's body parsing re-raises it)."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body is larger than the limit of {max_bytes} bytes")


class BodyLimit:
    """ASGI middleware answering 413 to a request body over ``max_bytes``.

    Checks the declared ``Content-Length`` first and counts the bytes actually received, so a chunked
    body without a length is cut off too.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _error(413, [{"field": "body", "message": BodyTooLarge(self.max_bytes).detail}])(scope, receive, send)


class BearerToken:
    """ASGI middleware answering 401 to a request without ``Authorization: Bearer <token>`` (compared in constant
    time), except on the probes ``/health`` and ``/ready``. Outermost, so an unauthenticated body is never read."""

    OPEN = frozenset({"/health", "/ready"})

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "missing or wrong bearer token (send 'Authorization: Bearer <token>')"
                response = _error(401, [{"field": "authorization", "message": message}])
                response.headers["www-authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(scorer: Scorer, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, token: str | None = None) -> FastAPI:
    """The FastAPI application serving ``scorer``; with ``token``, requests must carry it as a bearer token."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if token is not None and not token.strip():
        raise ValueError("the bearer token must not be empty")
    app = FastAPI(title="prerank", summary="Pre-ranking scorer", version=str(scorer.manifest.get("prerank_version")))
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if token is not None:
        app.add_middleware(BearerToken, token=token)  # added last: runs first
    lock = threading.Lock()
    metadata = {**scorer.metadata(), "max_body_bytes": max_body_bytes, "auth": "bearer" if token else None}
    ready = {"status": "ready", **{k: metadata[k] for k in ("model", "runtime", "weights_sha256", "num_items")}}

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                errors.append({"field": "body", "message": f"invalid JSON: {e.get('ctx', {}).get('error', '')}"})
                continue
            loc = [str(p) for p in e.get("loc", ()) if p != "body"]
            errors.append({"field": ".".join(loc) or "body", "message": str(e.get("msg", "invalid"))})
        return _error(422, errors)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error(413, [{"field": "body", "message": str(exc.detail)}])

    @app.exception_handler(ScoringError)
    async def _rejected(_request: Request, exc: ScoringError) -> JSONResponse:
        status = 413 if isinstance(exc, RequestTooLarge) else 422
        return _error(status, [{"field": exc.field, "message": exc.message}])

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def get_ready() -> dict[str, Any]:
        return ready

    @app.get("/metadata")
    def get_metadata() -> dict[str, Any]:
        return metadata

    def run(body: ScoreRequest) -> JSONResponse:
        with lock:
            result = scorer.score(body.user, body.candidates, k=body.k, cross=body.cross)
        return JSONResponse(asdict(result))

    # The body is parsed by pydantic's own JSON parser straight from bytes: for a request of 1,000
    # candidates with cross features that is several times faster than json.loads + validation.
    @app.post(
        "/score",
        response_model=ScoreResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ScoreRequest.model_json_schema()}},
            }
        },
    )
    async def score(request: Request) -> JSONResponse:
        try:
            body = ScoreRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from e
        return await run_in_threadpool(run, body)

    return app


#: How ``prerank serve --workers N`` hands its options (JSON) to the worker processes; the token goes in PRERANK_TOKEN.
SERVE_OPTIONS_ENV = "PRERANK_SERVE_OPTIONS"
TOKEN_ENV = "PRERANK_TOKEN"


def app_from_env() -> FastAPI:
    """The app of one worker process of ``prerank serve --workers N`` (a uvicorn factory: each worker loads and
    verifies the artifact itself). Options: ``artifact``, ``runtime``, ``threads``, ``unknown_items``,
    ``max_candidates`` and ``max_body_bytes`` as JSON in :data:`SERVE_OPTIONS_ENV`; the token in :data:`TOKEN_ENV`."""
    opts = json.loads(os.environ[SERVE_OPTIONS_ENV])
    scorer = Scorer.load(
        opts["artifact"],
        runtime=opts["runtime"],
        threads=opts["threads"],
        unknown_items=opts["unknown_items"],
        max_candidates=opts["max_candidates"],
    )
    return create_app(scorer, max_body_bytes=opts["max_body_bytes"], token=os.environ.get(TOKEN_ENV) or None)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yield its base URL, then shut it down.

    ``port=0`` binds a free port (the socket is bound here, so there is no race for it).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server on {host}:{bound} did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{bound}" if ":" not in host else f"http://[{host}]:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
