"""`flashrt serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn: `pip install "flashrt[server]"`).

    POST /v1/chat/completions   POST /v1/completions   (JSON, or server-sent events with "stream": true)
    GET  /v1/models             GET  /health

One Generator serves one request at a time: a single worker thread runs the generations, the
other requests wait in a bounded queue, and a request that finds the queue full gets 429.
A client that disconnects stops its generation at the next token (or leaves the queue).
Every bad request gets an OpenAI-style error body, {"error": {"message", "type", "param",
"code"}}, with 400 (malformed JSON, bad values, a prompt longer than the context), 401 (a
wrong key under --api-key), 404 (an unknown model or route); nothing a client sends stops the
server. SIGTERM (or Ctrl-C) stops accepting, lets the running and queued requests finish, and
exits 0.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from .errors import FlashrtError, GenerationError

try:  # the optional extra: only this module imports it
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError as e:
    raise FlashrtError(f"flashrt serve needs the server extra ({e.name} is missing): "
                       'pip install "flashrt[server]"') from None

MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused (400)
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """A request the server refuses: HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---------------------------------------------------------------------- request parameters
def _get(body: dict, name: str, kinds, default=None, lo=None, hi=None):
    """body[name] checked to be one of `kinds` (bool is never a number) within [lo, hi]."""
    v = body.get(name)
    if v is None:
        return default
    numeric = all(k in (int, float) for k in kinds)
    if (isinstance(v, bool) and bool not in kinds) or not isinstance(v, kinds):
        want = "a number" if float in kinds else ("an integer" if int in kinds else "/".join(k.__name__ for k in kinds))
        raise APIError(400, f"'{name}' must be {want}, got {json.dumps(v)[:80]}", param=name)
    if numeric and ((lo is not None and v < lo) or (hi is not None and v > hi)):
        raise APIError(400, f"'{name}' must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}", param=name)
    return v


def _sampling(body: dict, defaults: dict) -> dict:
    """The Generator keyword arguments of a request (server flags as defaults)."""
    if _get(body, "n", (int,), 1) != 1:
        raise APIError(400, "'n' must be 1: this server makes one choice per request", param="n")
    max_tokens = _get(body, "max_completion_tokens", (int,), None, lo=0)
    max_tokens = _get(body, "max_tokens", (int,), max_tokens, lo=0)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    return dict(
        max_new_tokens=max_tokens if max_tokens is not None else defaults["max_new_tokens"],
        temperature=_get(body, "temperature", (int, float), defaults["temperature"], lo=0),
        top_k=_get(body, "top_k", (int,), defaults["top_k"], lo=0) or None,  # 0 = off, as llama.cpp's
        top_p=_get(body, "top_p", (int, float), defaults["top_p"], lo=0, hi=1) or None,
        min_p=_get(body, "min_p", (int, float), defaults["min_p"], lo=0, hi=1),
        repeat_penalty=_get(body, "repeat_penalty", (int, float), defaults["repeat_penalty"], lo=0),
        repeat_last_n=_get(body, "repeat_last_n", (int,), defaults["repeat_last_n"], lo=0),
        seed=_get(body, "seed", (int,), defaults["seed"], lo=0),
        stop=stop,
    )


def _messages(body: dict) -> list:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(body: dict):
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p  # token ids
    raise APIError(400, "'prompt' must be one non-empty string (or one list of token ids)", param="prompt")


# ---------------------------------------------------------------------- the model's worker
class Job:
    """One generation: what to run, a cancel flag, and the queue its messages arrive on
    (("item", GenerationResponse) ... then ("done", usage) or ("error", exception))."""

    def __init__(self, loop, prompt, chat: bool, kwargs: dict, logprobs):
        self.loop, self.prompt, self.chat, self.kwargs, self.logprobs = loop, prompt, chat, kwargs, logprobs
        self.cancelled = threading.Event()
        self.messages: asyncio.Queue = asyncio.Queue()

    def emit(self, message) -> None:  # from the worker thread
        try:
            self.loop.call_soon_threadsafe(self.messages.put_nowait, message)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class Worker:
    """Runs jobs one at a time on one thread, with at most `queue` jobs waiting."""

    def __init__(self, generator, queue: int):
        self.g = generator
        self.queue = queue
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashrt-generate")
        self.lock = threading.Lock()
        self.n_jobs = 0  # running + waiting
        self.running = False

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.n_jobs >= 1 + self.queue:
                raise APIError(429, f"the server is busy: one request is running and {self.queue} are waiting "
                                    f"(flashrt serve --queue {self.queue}); retry later",
                               type="rate_limit_error", code="queue_full")
            self.n_jobs += 1
        self.executor.submit(self._run, job)

    def status(self) -> dict:
        with self.lock:
            return {"running": int(self.running), "waiting": self.n_jobs - int(self.running)}

    def _run(self, job: Job) -> None:
        with self.lock:
            self.running = True
        try:
            if job.cancelled.is_set():  # the client left while it waited
                job.emit(("done", None))
                return
            g = self.g
            ids = g.encode_chat(job.prompt) if job.chat else job.prompt
            if isinstance(ids, str):
                ids = g._encode(ids)
            if len(ids) >= g.max_context:
                raise APIError(400, f"the prompt is {len(ids)} tokens and the context is {g.max_context}; "
                                    "shorten it (or restart the server with a larger -c)",
                               code="context_length_exceeded", param="messages" if job.chat else "prompt")
            stream = g.stream_generate(ids, logprobs=job.logprobs, **job.kwargs)
            try:
                for r in stream:
                    if job.cancelled.is_set():
                        break
                    job.emit(("item", r))
            finally:
                stream.close()
            st = g.stats
            job.emit(("done", {"prompt_tokens": st.n_prompt_tokens, "completion_tokens": st.n_generated_tokens,
                               "total_tokens": st.n_prompt_tokens + st.n_generated_tokens}))
        except BaseException as e:  # noqa: BLE001  (reported to the request, never kills the worker)
            job.emit(("error", e))
        finally:
            with self.lock:
                self.running = False
                self.n_jobs -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def _as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, GenerationError):
        return APIError(400, " ".join(str(e).split()))
    if isinstance(e, FlashrtError):
        return APIError(500, " ".join(str(e).split()), type="server_error")
    return APIError(500, f"internal error: {type(e).__name__}: {' '.join(str(e).split())}", type="server_error")


# ---------------------------------------------------------------------- the app
class Server:
    """The HTTP face of one Generator."""

    def __init__(self, generator, model_id: str, aliases=(), api_key: str | None = None, queue: int = 8,
                 defaults: dict | None = None):
        self.g = generator
        self.model_id = model_id
        self.names = {model_id, *[a for a in aliases if a]}
        self.api_key = api_key
        self.worker = Worker(generator, queue)
        self.defaults = dict(max_new_tokens=None, temperature=0.0, top_k=None, top_p=None, min_p=None,
                             repeat_penalty=1.0, repeat_last_n=64, seed=None)
        self.defaults.update(defaults or {})
        self.created = int(time.time())
        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error,
                                                                Exception: self._internal_error})

    # -- plumbing
    async def _http_error(self, request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, code=code).response()

    async def _internal_error(self, request, exc):
        return _as_api_error(exc).response()

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "invalid API key: send 'Authorization: Bearer <the key flashrt serve was given>'",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(400, f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model not in self.names:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")
        return body

    # -- routes
    async def health(self, request):
        return JSONResponse({"status": "ok", "model": self.model_id, **self.worker.status()})

    async def models(self, request):
        try:
            self._authorize(request)
        except APIError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "flashrt"}]})

    async def chat_completions(self, request):
        return await self._complete(request, chat=True)

    async def completions(self, request):
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool):
        try:
            self._authorize(request)
            body = await self._body(request)
            if chat:
                if not (self.g.tokenizer is not None and self.g.tokenizer.chat_template):
                    raise APIError(400, "this model has no chat template; use /v1/completions")
                prompt = _messages(body)
                want = _get(body, "logprobs", (bool,), False)
                logprobs = _get(body, "top_logprobs", (int,), 0, lo=0, hi=MAX_TOP_LOGPROBS) if want else None
            else:
                prompt = _prompt(body)
                logprobs = _get(body, "logprobs", (int,), None, lo=0, hi=MAX_TOP_LOGPROBS)
            kwargs = _sampling(body, self.defaults)
            stream = _get(body, "stream", (bool,), False)
            options = body.get("stream_options") or {}
            include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
            job = Job(asyncio.get_running_loop(), prompt, chat, kwargs, logprobs)
            self.worker.submit(job)
        except APIError as e:
            return e.response()
        # Until the first message (queue + prefill), watch for the client leaving.
        first = await self._first_message(request, job)
        if first is None:
            return JSONResponse({}, status_code=499)  # nobody reads it
        if first[0] == "error":
            return _as_api_error(first[1]).response()
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            return StreamingResponse(self._sse(job, first, ident, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, job, first, ident, chat)

    async def _first_message(self, request, job):
        got = asyncio.ensure_future(job.messages.get())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not got.done():
            job.cancelled.set()
            got.cancel()
            return None
        return got.result()

    async def _messages_of(self, job, first):
        message = first
        while True:
            yield message
            if message[0] != "item":
                return
            message = await job.messages.get()

    async def _whole(self, request, job, first, ident, chat):
        gone = asyncio.ensure_future(_disconnected(request))
        gone.add_done_callback(lambda _: job.cancelled.set())
        try:
            items, usage = [], None
            async for kind, value in self._messages_of(job, first):
                if kind == "item":
                    items.append(value)
                elif kind == "error":
                    return _as_api_error(value).response()
                else:
                    usage = value
        finally:
            gone.cancel()
        if usage is None:  # cancelled
            return JSONResponse({}, status_code=499)
        text = "".join(r.text for r in items)
        finish = items[-1].finish_reason if items else "length"
        lp = self._logprobs(items, chat) if job.logprobs is not None else None
        choice = {"index": 0, "finish_reason": finish, "logprobs": lp}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_id, "choices": [choice],
                             "usage": usage})

    async def _sse(self, job, first, ident, chat, include_usage):
        """The server-sent events of a streamed completion; cancelled (the client left) ->
        the generation stops at its next token."""
        created = int(time.time())
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_or_text, finish=None, logprobs=None, usage=None, choices=True):
            c = {"id": ident, "object": kind_name, "created": created, "model": self.model_id}
            if choices:
                choice = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
                choice["delta" if chat else "text"] = delta_or_text
                c["choices"] = [choice]
            else:
                c["choices"] = []
            if usage is not None:
                c["usage"] = usage
            return f"data: {json.dumps(c)}\n\n"

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            finish = None
            async for kind, value in self._messages_of(job, first):
                if kind == "item":
                    finish = value.finish_reason or finish
                    lp = self._logprobs([value], chat) if job.logprobs is not None else None
                    if value.text or lp:
                        yield chunk({"content": value.text} if chat else value.text, logprobs=lp)
                elif kind == "error":
                    e = _as_api_error(value)
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'code': e.code}})}\n\n"
                    return
                else:
                    usage = value
                    yield chunk({} if chat else "", finish=finish or "length",
                                usage=None if include_usage else usage)
                    if include_usage:
                        yield chunk(None, usage=usage, choices=False)
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a no-op once finished; stops a generation whose client left

    def _logprobs(self, items, chat):
        tok = self.g.tokenizer
        steps = [r for r in items if r.token is not None and r.logprob is not None]
        name = lambda t: tok.decode([t]) if tok is not None else str(t)  # noqa: E731
        if chat:
            def entry(t, lp):
                s = name(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

            return {"content": [dict(entry(r.token, r.logprob),
                                     top_logprobs=[entry(t, lp) for t, lp in r.top_logprobs.items()])
                                for r in steps]}
        offsets, at = [], 0
        for r in steps:
            offsets.append(at)
            at += len(name(r.token))
        def top(r):  # keyed by text: tokens that spell the same text keep the likeliest one
            d = {}
            for t, lp in r.top_logprobs.items():
                d.setdefault(name(t), lp)
            return d

        return {"tokens": [name(r.token) for r in steps], "token_logprobs": [r.logprob for r in steps],
                "top_logprobs": [top(r) for r in steps], "text_offset": offsets}


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read before)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------- `flashrt serve`
class _Uvicorn(uvicorn.Server):
    """uvicorn's server, saying where it listens once it does."""

    announce = None

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started and self.announce:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.announce(host, port)


class _OneLineLog(logging.Handler):
    """uvicorn's log records as one line each, `flashrt: ...`; errors also kept (the last one
    names why the server could not start)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.errors = []

    def emit(self, record):
        message = " ".join(record.getMessage().split())
        if record.levelno >= logging.ERROR:
            self.errors.append(message)
            if not message.startswith("[Errno"):  # a bind error is said once, by serve()
                print(f"flashrt: server error: {message}", file=sys.stderr)
        else:
            print(f"flashrt: warning: {message}", file=sys.stderr)


def serve(args) -> int:
    from .cli import _open_generator  # the CLI's options -> Generator

    if args.queue < 0:
        raise FlashrtError(f"--queue must be >= 0, got {args.queue}")
    if not 0 <= args.port <= 65535:
        raise FlashrtError(f"--port must be from 0 to 65535 (0: any free port), got {args.port}")
    log = _OneLineLog()
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [log] if name == "uvicorn" else [], name != "uvicorn"
        logger.setLevel(logging.WARNING)
    api_key = args.api_key or os.environ.get("FLASHRT_API_KEY") or None
    with _open_generator(args) as g:
        model_id = args.name or g.path.name
        defaults = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                        repeat_last_n=args.repeat_last_n, seed=args.seed)
        server = Server(g, model_id, aliases=[args.model], api_key=api_key, queue=args.queue, defaults=defaults)
        config = uvicorn.Config(server.app, host=args.host, port=args.port, log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=None)
        u = _Uvicorn(config)
        u.announce = lambda host, port: print(
            f"flashrt: serving {model_id} at http://{host}:{port}/v1 (one request at a time, {args.queue} may "
            f"wait{'; API key required' if api_key else ''}); Ctrl-C or SIGTERM stops", file=sys.stderr, flush=True)
        # uvicorn catches SIGINT/SIGTERM, drains, then raises the signal again for the handler
        # that was there before: a no-op here, so a drained server exits 0.
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            u.run()
        except SystemExit:  # uvicorn's way to say it could not start (it logged why)
            u.started = False
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            server.worker.close()
        if not u.started:
            why = log.errors[-1] if log.errors else "in use, or not an address of this machine"
            raise FlashrtError(f"cannot listen on {args.host}:{args.port}: {why}")
    print("flashrt: server stopped", file=sys.stderr)
    return 0
