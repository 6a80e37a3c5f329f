"""``gkd serve-teacher MODEL``: the teacher in its own process, scoring token ids over HTTP.

The scoring is :class:`TeacherService` (plain Python, tested without a network); :func:`create_app`
wraps it in a FastAPI app (bearer-token check, body read against its limit, JSON parsing, one-line
``{"error": …}`` bodies for every status) that uvicorn serves with :func:`guarded_protocol`
(header timeout, a cap on open connections). Bodies are parsed and scored one request at a time on
one worker thread, in sub-batches of at most ``chunk_tokens`` padded tokens, and the vocabulary axis a
chunk of positions at a time (:func:`gkd.chunked.teacher_topk_and_targets`), so memory stays flat
whatever the request size within the limits; freed memory is handed back to the OS after each request.
"""

# no ``from __future__ import annotations``: FastAPI reads the endpoints' annotations (``Request``) at runtime
import asyncio
import hmac
import json
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gkd.chunked import teacher_topk_and_targets
from gkd.data import Example, collate, reference_rollout
from gkd.rollout import Rollout
from gkd.scorer import completion_outputs, lm_head
from gkd.serving.protocol import PROTOCOL_VERSION, encode_array, tokenizer_hash

__all__ = ["RequestError", "ServerLimits", "TeacherService", "create_app", "serve",
           "guarded_protocol", "json_depth", "url_of", "uvicorn_config"]

logger = logging.getLogger("gkd")


class RequestError(Exception):
    """A request the server refuses: ``status`` (400, 401, 408, 413, 415, 422) and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServerLimits:
    """What one request and one connection may ask for (over-large requests get 413 with the limit named)."""

    max_batch_size: int = 256  # sequences per request
    max_sequence_length: int = 8192  # prompt + completion tokens of one sequence
    max_batch_tokens: int = 262144  # prompt + completion tokens of a whole request
    max_top_k: int = 1024
    chunk_tokens: int = 16384  # padded tokens per teacher forward (sub-batch)
    vocab_chunk: int = 1024  # positions per LM-head / top-k chunk
    max_body_bytes: int = 16 << 20  # ~8 bytes per token in JSON: max_batch_tokens fits 8× over
    max_json_depth: int = 8  # a /score body is 4 levels deep
    min_temperature: float = 1e-3  # τ below it (1e-300 is 0 in float32) would overflow logits / τ
    max_temperature: float = 1e3
    max_connections: int = 64  # open connections; more are answered 503 and closed at once
    header_timeout: float = 10.0  # seconds for a connection to deliver a request's headers
    body_timeout: float = 60.0  # seconds for a request's whole body
    concurrent_bodies: int = 4  # request bodies read at once (each at most max_body_bytes)


class TeacherService:
    """Scores batches of token ids with a causal LM: top-k log-probs + tail and the sequence token's log-prob."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, name: str = "", limits: ServerLimits | None = None,
                 device: str | torch.device | None = None, fingerprint: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer, self.name = tokenizer, name
        self.limits = limits or ServerLimits()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.vocab_size = len(tokenizer)
        self.hash = tokenizer_hash(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions:
            self.limits.max_sequence_length = min(self.limits.max_sequence_length, int(positions))
        if fingerprint is None:  # a module without files: its parameters (serve() passes the files' fingerprint)
            from gkd.serving.cache import module_fingerprint

            fingerprint = module_fingerprint(model)
        self.fingerprint = fingerprint
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        """``GET /info``: the protocol, the model's name and fingerprint, the tokenizer hash and the limits
        (the client re-reads it after every reconnect and stops if the identity changed)."""
        lim = self.limits
        return {"protocol": PROTOCOL_VERSION, "model": self.name, "model_fingerprint": self.fingerprint,
                "tokenizer_hash": self.hash, "vocab_size": self.vocab_size, "max_body_bytes": lim.max_body_bytes,
                "max_batch_size": lim.max_batch_size,
                "max_sequence_length": lim.max_sequence_length, "max_batch_tokens": lim.max_batch_tokens,
                "max_top_k": min(lim.max_top_k, self.vocab_size)}

    def validate(self, request: dict[str, Any]) -> tuple[list[list[int]], list[list[int]], int, float]:
        """``(prompts, completions, k, τ)`` of a well-formed request, else :class:`RequestError`."""
        lim = self.limits
        if not isinstance(request, dict):
            raise RequestError(400, "the body must be a JSON object with 'sequences', 'top_k' and 'temperature'")
        unknown = sorted(set(request) - {"sequences", "top_k", "temperature"})
        if unknown:
            raise RequestError(400, f"unknown field(s) {unknown}; expected 'sequences', 'top_k', 'temperature'")
        sequences, k, tau = request.get("sequences"), request.get("top_k"), request.get("temperature", 1.0)
        if not isinstance(sequences, list) or not sequences:
            raise RequestError(400, "'sequences' must be a non-empty list of {prompt_ids, completion_ids}")
        if len(sequences) > lim.max_batch_size:
            raise RequestError(413, f"{len(sequences)} sequences in one request; this server takes at most "
                                    f"{lim.max_batch_size} (max_batch_size)")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(lim.max_top_k, self.vocab_size):
            raise RequestError(400, f"top_k={k!r} must be an integer in [1, {min(lim.max_top_k, self.vocab_size)}]")
        if (isinstance(tau, bool) or not isinstance(tau, int | float)
                or not lim.min_temperature <= float(tau) <= lim.max_temperature):
            raise RequestError(400, f"temperature={tau!r} must be a number in [{lim.min_temperature:g}, "
                                    f"{lim.max_temperature:g}]")
        prompts, completions, total = [], [], 0
        for i, seq in enumerate(sequences):
            if not isinstance(seq, dict) or set(seq) != {"prompt_ids", "completion_ids"}:
                raise RequestError(400, f"sequences[{i}] must be an object with exactly 'prompt_ids' and 'completion_ids'")
            p, c = seq["prompt_ids"], seq["completion_ids"]
            for field, ids in (("prompt_ids", p), ("completion_ids", c)):
                if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise RequestError(400, f"sequences[{i}].{field} must be a list of integer token ids")
                bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise RequestError(400, f"sequences[{i}].{field} holds token id {bad}, outside the teacher's "
                                            f"vocabulary [0, {self.vocab_size})")
            if not p or not c:
                raise RequestError(400, f"sequences[{i}] needs at least one prompt token and one completion token")
            if len(p) + len(c) > lim.max_sequence_length:
                raise RequestError(413, f"sequences[{i}] has {len(p) + len(c)} tokens; this server takes at most "
                                        f"{lim.max_sequence_length} per sequence (max_sequence_length)")
            total += len(p) + len(c)
            prompts.append(p)
            completions.append(c)
        if total > lim.max_batch_tokens:
            raise RequestError(413, f"{total} tokens in one request; this server takes at most {lim.max_batch_tokens} "
                                    "(max_batch_tokens): send smaller batches")
        return prompts, completions, int(k), float(tau)

    def _sub_batches(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[int]]:
        """Consecutive groups of sequences whose padded size stays within ``chunk_tokens``."""
        groups: list[list[int]] = [[]]
        width_p = width_c = 0
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            wp, wc = max(width_p, len(p)), max(width_c, len(c))
            if groups[-1] and (len(groups[-1]) + 1) * (wp + wc) > self.limits.chunk_tokens:
                groups.append([])
                wp, wc = len(p), len(c)
            groups[-1].append(i)
            width_p, width_c = wp, wc
        return groups

    @torch.no_grad()
    def score(self, request: dict[str, Any]) -> dict[str, Any]:
        """The response of ``POST /score`` (see :mod:`gkd.serving.protocol`)."""
        prompts, completions, k, tau = self.validate(request)
        ids, logps, tails, tokens = [], [], [], []
        head = lm_head(self.model)
        with self._lock:
            for group in self._sub_batches(prompts, completions):
                rollout = self._rollout([prompts[i] for i in group], [completions[i] for i in group])
                out = completion_outputs(self.model, rollout, self.vocab_size, final_hidden=True)
                assert out.final_hidden is not None
                hidden = out.final_hidden[rollout.completion_mask]  # (n, H): real positions, in order
                targets = rollout.completion_ids[rollout.completion_mask]
                top, token = teacher_topk_and_targets(hidden, k, targets, head=head, vocab_size=self.vocab_size,
                                                      temperature=tau, chunk_size=self.limits.vocab_chunk)
                assert token is not None
                ids.append(top.indices.int())
                logps.append(top.logprobs)
                tails.append(top.log_tail)
                tokens.append(token)
        values = [torch.cat(logps), torch.cat(tails), torch.cat(tokens)]
        if not all(bool(torch.isfinite(v).all()) for v in values):  # never a NaN answer
            raise RequestError(422, f"the teacher's log-probs at temperature {tau:g} are not finite (NaN/inf in its "
                                    "logits?); nothing was returned")
        return {"topk_ids": encode_array(torch.cat(ids)), "topk_logprobs": encode_array(values[0]),
                "log_tail": encode_array(values[1]), "token_logprobs": encode_array(values[2]),
                "lengths": [len(c) for c in completions]}

    def _rollout(self, prompts: list[list[int]], completions: list[list[int]]) -> Rollout:
        """Left-padded prompts, right-padded completions: the training batch layout (:func:`gkd.data.collate`)."""
        examples = [Example(prompt_ids=p, reference_ids=c, row={}) for p, c in zip(prompts, completions, strict=True)]
        return reference_rollout(collate(examples, self.pad_id)).to(self.device)


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_depth(body: bytes) -> int:
    """How deeply arrays / objects nest in a JSON text (brackets inside strings ignored), in C speed:
    checked before parsing, so a deeply nested body is a 400, never a RecursionError."""
    raw = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    where = np.flatnonzero((raw == ord("[")) | (raw == ord("{")) | (raw == ord("]")) | (raw == ord("}")))
    if where.size == 0:
        return 0
    opens = np.isin(raw[where], (ord("["), ord("{")))
    return int(np.cumsum(np.where(opens, 1, -1)).max())


def parse_request(body: bytes, max_depth: int) -> Any:
    """The JSON value of a request body, or :class:`RequestError` (400) naming what is wrong with it."""
    depth = json_depth(body)
    if depth > max_depth:
        raise RequestError(400, f"the JSON body is nested {depth} levels deep; this server takes at most {max_depth} "
                                "(max_json_depth)")
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError(400, "the JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {str(e).splitlines()[0]}") from None


def _release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and a burst of large requests
    would leave the server's resident memory at its peak)."""
    import ctypes
    import ctypes.util

    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
_ROUTES = "GET /health, GET /info, POST /score"


def _error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": " ".join(str(message).split()) or f"HTTP {status}"}).encode()


def create_app(service: TeacherService, api_key: str | None = None):
    """The FastAPI app: ``GET /health`` (no auth), ``GET /info`` and ``POST /score`` (bearer token when
    ``api_key`` is set, checked before the body is read). Every answer other than a 200 is
    ``{"error": "one line"}`` (401, 404, 405, 408, 413, 415, 422, 400 and the unforeseen 500); the
    server keeps serving. A body is read chunk by chunk and refused (413) as soon as it passes
    ``max_body_bytes``, chunked or not; parsing and scoring run on one worker thread, one request at a time."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="gkd teacher", docs_url=None, redoc_url=None, openapi_url=None)
    limits = service.limits
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gkd-score")  # one arena, one request at a time
    import weakref

    reading: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop → its body-reading semaphore

    def refuse(status: int, message: str) -> Response:
        # a refusal before the whole body was read closes the connection: the rest of the body is not read
        headers = {"connection": "close"} if status in (401, 408, 413, 415) else None
        return Response(_error_body(status, message), status_code=status, media_type="application/json",
                        headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no endpoint {request.url.path}; this server has {_ROUTES}",
                   405: f"{request.method} is not allowed on {request.url.path}; this server has {_ROUTES}",
                   }.get(exc.status_code, str(exc.detail))
        return Response(_error_body(exc.status_code, message), status_code=exc.status_code,
                        media_type="application/json", headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("gkd serve-teacher: %s %s failed", request.method, request.url.path)
        return refuse(500, f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    async def read_body(request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the limit and (408) when it takes too long."""
        body = bytearray()
        try:
            async with asyncio.timeout(limits.body_timeout):
                async for chunk in request.stream():
                    if len(body) + len(chunk) > limits.max_body_bytes:
                        raise RequestError(413, f"request body over {limits.max_body_bytes} bytes; this server "
                                                "takes at most that (max_body_bytes): send smaller batches")
                    body += chunk
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {limits.body_timeout:g} s "
                                    "(body_timeout)") from None
        return bytes(body)

    def parse_and_score(body: bytes) -> bytes:
        try:
            return json.dumps(service.score(parse_request(body, limits.max_json_depth))).encode()
        finally:
            del body
            _release_memory()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    def info(request: Request):
        if not authorized(request):
            return refuse(401, "missing or wrong bearer token (Authorization: Bearer <key>)")
        return service.info()

    @app.post("/score")
    async def score(request: Request):
        if not authorized(request):
            return refuse(401, "missing or wrong bearer token (Authorization: Bearer <key>)")
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            return refuse(415, f"content type {media or '(none)'!r}; /score takes application/json")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            return refuse(413, f"request body of {length} bytes; this server takes at most "
                               f"{limits.max_body_bytes} (max_body_bytes): send smaller batches")
        loop = asyncio.get_running_loop()
        if loop not in reading:
            reading[loop] = asyncio.Semaphore(limits.concurrent_bodies)
        try:
            async with reading[loop]:
                body = await read_body(request)
            answer = await loop.run_in_executor(worker, parse_and_score, body)
            del body
        except RequestError as e:
            return refuse(e.status, str(e))
        except ClientDisconnect:
            return refuse(400, "the client disconnected before sending the whole body")
        return Response(answer, media_type="application/json")

    return app


def guarded_protocol(limits: ServerLimits) -> type:
    """uvicorn's h11 connection handler plus what uvicorn lacks: a connection that has not delivered a
    request's headers within ``limits.header_timeout`` seconds (a fresh one, or an idle keep-alive one)
    is closed; past ``limits.max_connections`` open connections a new one is answered 503 and closed;
    a malformed request gets the ``{"error": …}`` body instead of plain text. (A function, not a
    module-level class: uvicorn is imported only when serving.)"""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                body = _error_body(503, f"this server holds {limits.max_connections} open connections "
                                        "(max_connections): retry later")
                transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
                                + body)
                transport.close()
                return
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            cycle = self.cycle

            def expire() -> None:  # no new request since armed and none in progress: drop the connection
                if (self.cycle is cycle and (cycle is None or cycle.response_complete)
                        and not self.transport.is_closing()):
                    self.transport.close()

            self.loop.call_later(limits.header_timeout, expire)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def send_400_response(self, msg: str) -> None:
            body = _error_body(400, f"malformed HTTP request: {msg}")
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
            self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(service: TeacherService, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                   log_level: str = "warning"):
    """The ``uvicorn.Config`` ``serve`` runs: the app, the guarded protocol, a 5 s keep-alive."""
    import uvicorn

    return uvicorn.Config(create_app(service, api_key), host=host, port=port, log_level=log_level,
                          http=guarded_protocol(service.limits), timeout_keep_alive=5)


def url_of(host: str, port: int) -> str:
    """``http://host:port`` with an IPv6 address in brackets (``http://[::1]:8000``)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          dtype: str = "float32", device: str | None = None, limits: ServerLimits | None = None) -> None:
    """Load ``model`` (any name ``gkd train`` takes as a teacher) and serve it until interrupted."""
    import socket

    import uvicorn

    from gkd.errors import InputError
    from gkd.models import load_model, load_tokenizer, resolve_model
    from gkd.serving.cache import module_fingerprint, teacher_fingerprint

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # a busy port is one line, before the model loads
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot listen on {url_of(host, port)[7:]}: {e.strerror or e} (pick another --port)"
                             ) from None
    path = resolve_model(model, role="teacher")
    tokenizer = load_tokenizer(path)
    net = load_model(path, dtype)
    # the identity /info publishes: the weight files (whole-file SHA-256, remembered), else the parameters
    fingerprint = teacher_fingerprint(model, path)
    if fingerprint.startswith("name:"):
        fingerprint = module_fingerprint(net)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device)
    service = TeacherService(net, tokenizer, name=model, limits=limits, device=device, fingerprint=fingerprint)
    print(f"gkd serve-teacher: {model} on {url_of(host, port)} (vocabulary {service.vocab_size}, tokenizer "
          f"{service.hash[:12]}…, weights {fingerprint.split(':')[-1][:12]}…, "
          f"{'bearer token required' if api_key else 'no token'})", flush=True)
    uvicorn.Server(uvicorn_config(service, host=host, port=port, api_key=api_key)).run()
