"""./run_serve.sh: a trained adapter as an HTTP JSON API (FastAPI on uvicorn; OpenAPI docs at /docs).

POST /tag {"text": "..."} -> {"entities": [{"start", "end", "label", "text"}, ...]}
POST /tag {"texts": ["...", ...]} -> {"results": [{"entities": [...]}, ...]}
GET /health -> {"status": "serving", "batches": ..., "requests": ..., "texts": ..., ...}

One thread owns the model. Requests wait in a bounded queue in front of it, and each decode takes every request that
waits (whole requests, up to --max-batch-texts texts) in one Tagger.tag call: requests that arrive while the engine
decodes go together into its next batch, never one at a time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from qloraner import QloranerError, run_main
from qloraner.config import DecodeSettings, opt, parser_for, raise_if


@dataclass(frozen=True)
class ServeConfig(DecodeSettings):
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = opt(8080, "TCP port; 0 takes a free one (the startup line names it)", ge=0, le=65535)
    max_body_bytes: int = opt(1 << 20, "largest request body; larger: 413", gt=0)
    max_texts: int = opt(256, "most texts in one request; more: 413", gt=0)
    max_chars: int = opt(20_000, "most characters in one text; more: 413", gt=0)
    max_queue: int = opt(1024, "most requests waiting for the engine; more: 429", gt=0)
    max_batch_texts: int = opt(1024, "most texts in one decode; requests beyond it wait for the next", gt=0)

    def __post_init__(self) -> None:
        errors = self.decode_errors()
        if self.max_texts > self.max_batch_texts:
            errors.append("--max-texts: must be <= --max-batch-texts (a request is decoded in one batch)")
        raise_if(errors)


class QueueFull(Exception):
    pass


class Closed(Exception):
    pass


@dataclass
class _Job:
    texts: list[str]
    done: Future = field(default_factory=Future)


class Batcher:
    """A decode thread that owns `tag` (texts -> per text its result) behind a bounded queue of requests."""

    def __init__(self, tag: Callable[[list[str]], list], max_queue: int, max_batch_texts: int) -> None:
        self._tag, self.max_queue, self.max_batch_texts = tag, max_queue, max_batch_texts
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self.refusing = False  # set from a signal handler: a plain flag, no lock (the handler may interrupt one)
        self._stopping = False
        self.stats = {"batches": 0, "requests": 0, "texts": 0, "max_batch_requests": 0, "accepted": 0, "failed": 0}
        self._thread = threading.Thread(target=self._run, name="qloraner-decode", daemon=True)
        self._thread.start()

    def submit(self, texts: Sequence[str]) -> Future:
        """A future of per text its result; QueueFull when max_queue requests wait, Closed once refusing."""
        job = _Job(list(texts))
        with self._cond:
            if self.refusing or self._stopping:
                raise Closed
            if len(self._jobs) >= self.max_queue:
                raise QueueFull
            self._jobs.append(job)
            self.stats["accepted"] += 1
            self._cond.notify()
        return job.done

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def _take(self) -> list[_Job] | None:
        """Every waiting request that fits one decode (at least one); None once stopping with none left."""
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            batch: list[_Job] = []
            count = 0
            while self._jobs and (not batch or count + len(self._jobs[0].texts) <= self.max_batch_texts):
                job = self._jobs.popleft()
                if job.done.set_running_or_notify_cancel():  # False: its client went away; decode nothing for it
                    batch.append(job)
                    count += len(job.texts)
            return batch if batch or not self._stopping else None

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[_Job]) -> None:
        texts = [t for job in batch for t in job.texts]
        try:
            found = iter(self._tag(texts))
        except Exception as err:  # a failed decode fails its own requests, not the server
            traceback.print_exc(file=sys.stderr)
            self.stats["failed"] += len(batch)
            for job in batch:
                job.done.set_exception(err)
            return
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["texts"] += len(texts)
        self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], len(batch))
        for job in batch:
            job.done.set_result([next(found) for _ in job.texts])

    def close(self) -> None:
        """Refuse new requests, decode those that wait, stop the thread."""
        with self._cond:
            self.refusing = self._stopping = True
            self._cond.notify_all()
        self._thread.join()


class Reject(Exception):
    """A request the server answers with `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def parse_request(body: bytes, config: ServeConfig) -> tuple[list[str], bool]:
    """The texts of a /tag body and whether it came as one "text"; Reject with a one-line reason otherwise."""
    try:
        record = json.loads(body.decode("utf-8-sig"))  # a byte-order mark is no part of the JSON
    except UnicodeDecodeError as err:
        raise Reject(400, f"body is not UTF-8 ({err.reason} at byte {err.start})") from None
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser goes
        raise Reject(400, f"body is not JSON ({str(err) or type(err).__name__})") from None
    if not isinstance(record, dict) or ("text" in record) == ("texts" in record):
        raise Reject(422, 'expected a JSON object with "text" (a string) or "texts" (a list of strings), one of them')
    if unknown := sorted(set(record) - {"text", "texts"}):
        raise Reject(422, f"unknown field(s): {', '.join(map(json.dumps, unknown))}")
    single = "text" in record
    texts = [record["text"]] if single else record["texts"]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise Reject(422, '"text" must be a string' if single else '"texts" must be a list of strings')
    if len(texts) > config.max_texts:
        raise Reject(413, f"{len(texts)} texts; at most {config.max_texts} per request")
    for i, text in enumerate(texts):
        if len(text) > config.max_chars:
            raise Reject(413, f"text {i} has {len(text)} characters; at most {config.max_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON's \ud800 escapes: no Unicode text, and no offsets to answer in
            raise Reject(422, f"text {i} holds a lone surrogate (not Unicode text)") from None
    return texts, single


async def read_body(request, limit: int) -> bytes:
    """The request body; Reject (413) as soon as it passes `limit` bytes, declared or sent."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Reject(413, f"body of {declared} bytes; at most {limit}")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise Reject(413, f"body over {limit} bytes")
    return bytes(data)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _entities(found: list) -> dict:
    return {"entities": [asdict(e) for e in found]}


def create_app(config: ServeConfig, batcher: Batcher) -> FastAPI:
    """The FastAPI app over `batcher`; its shutdown (after uvicorn has answered every open request) stops it."""

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="qloraner", summary="Named entities in any text, with character offsets", lifespan=lifespan)
    _answer_errors_in_json(app)
    body_schema = {"type": "object", "properties": {"text": {"type": "string"}, "texts": {"type": "array"}}}
    openapi = {"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}}}

    @app.post("/tag", openapi_extra=openapi)
    async def tag(request: Request):
        """{"text": "..."} -> {"entities": [...]}; {"texts": [...]} -> {"results": [{"entities": [...]}, ...]}."""
        texts, single = parse_request(await read_body(request, config.max_body_bytes), config)
        found = await _tagged(texts, batcher) if texts else []
        if isinstance(found, JSONResponse):
            return found
        return _entities(found[0]) if single else {"results": [_entities(f) for f in found]}

    @app.get("/health")
    async def health():
        """200 while serving, 503 once draining; counters of the decodes so far."""
        status = "draining" if batcher.refusing else "serving"
        body = {"status": status, "adapter": config.adapter, "queued": batcher.queued, **batcher.stats}
        if status == "serving":
            return body
        return JSONResponse({"error": "shutting down", **body}, status_code=503)

    return app


async def _tagged(texts: list[str], batcher: Batcher) -> list | JSONResponse:
    """Per text its entities, from the batcher's next decode; a 429, 503 or 500 response where it cannot."""
    try:
        future = batcher.submit(texts)
    except QueueFull:
        return _error(429, f"{batcher.max_queue} requests already wait; try again later")
    except Closed:
        return _error(503, "shutting down; not taking new requests")
    try:
        return await asyncio.wrap_future(future)
    except Exception as err:  # the decode thread printed its traceback
        return _error(500, f"decoding failed: {type(err).__name__}: {err}".splitlines()[0])


def _answer_errors_in_json(app: FastAPI) -> None:
    """Every error as {"error": one line}: our rejections, HTTP errors (404, 405) and FastAPI's own checks."""

    @app.exception_handler(Reject)
    async def rejected(_request, err: Reject):
        return _error(err.status, err.message)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        return _error(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid request')}")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts: port 0 then has its number for the startup line."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise QloranerError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(2048)
    return sock


def _server(app, on_exit: Callable[[], None]):
    """uvicorn's server, whose SIGTERM/SIGINT handler first makes new requests 503 (`on_exit`), then shuts down as
    uvicorn does: it stops accepting, waits for every open request's answer, then runs the app's shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            on_exit()
            super().handle_exit(sig, frame)

    # no timeout_graceful_shutdown: requests in flight are answered however long their decode takes
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=5)
    return Server(config)


def load_tagger(config: ServeConfig):
    """The Tagger the server decodes with (bench.py serve loads the same for its offline figure)."""
    from qloraner.tag import Tagger

    return Tagger.from_settings(config, progress=False)


def serve(config: ServeConfig) -> None:
    """Load the adapter, listen, log one line, serve until SIGTERM (or Ctrl-C), answer what is in flight, return."""
    tagger = load_tagger(config)
    tagger.tag(["Warm up in Berlin."])  # the first decode compiles and captures; no client should wait for that
    sock = listen(config.host, config.port)
    batcher = Batcher(tagger.tag, config.max_queue, config.max_batch_texts)
    server = _server(create_app(config, batcher), on_exit=lambda: setattr(batcher, "refusing", True))
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    print(f"qloraner serve: listening on http://{where}:{port} (adapter {config.adapter})", file=sys.stderr, flush=True)
    # uvicorn raises the signal it caught again once it has shut down; a handler that ignores SIGTERM then makes the
    # exit a clean 0 instead of death by the default action
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])


def settings(argv: list[str] | None) -> ServeConfig:
    parser = parser_for(ServeConfig, "Serve a trained adapter as an HTTP JSON API (./run_serve.sh)")
    return ServeConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        serve(settings(argv))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
