"""``gkd serve-teacher MODEL``: the teacher in its own process, scoring token ids over HTTP.

The scoring is :class:`TeacherService` (plain Python, tested without a network); :func:`create_app`
wraps it in a FastAPI app (request parsing, bearer-token check, one-line 4xx errors) that uvicorn
serves. One request is scored at a time (a lock), in sub-batches of at most ``chunk_tokens`` padded
tokens, and the vocabulary axis a chunk of positions at a time (:func:`gkd.chunked.teacher_topk_and_targets`),
so memory stays flat whatever the request size within the limits.
"""

# no ``from __future__ import annotations``: FastAPI reads the endpoints' annotations (``Request``) at runtime
import hmac
import threading
from dataclasses import dataclass
from typing import Any

import torch

from gkd.chunked import teacher_topk_and_targets
from gkd.data import Example, collate, reference_rollout
from gkd.rollout import Rollout
from gkd.scorer import completion_outputs, lm_head
from gkd.serving.protocol import PROTOCOL_VERSION, encode_array, tokenizer_hash

__all__ = ["RequestError", "ServerLimits", "TeacherService", "create_app", "serve"]


class RequestError(Exception):
    """A request the server refuses: ``status`` (400, 401, 413) and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServerLimits:
    """What one request may ask for (over-large requests get 413 with the limit named)."""

    max_batch_size: int = 256  # sequences per request
    max_sequence_length: int = 8192  # prompt + completion tokens of one sequence
    max_batch_tokens: int = 262144  # prompt + completion tokens of a whole request
    max_top_k: int = 1024
    chunk_tokens: int = 16384  # padded tokens per teacher forward (sub-batch)
    vocab_chunk: int = 1024  # positions per LM-head / top-k chunk
    max_body_bytes: int = 64 << 20


class TeacherService:
    """Scores batches of token ids with a causal LM: top-k log-probs + tail and the sequence token's log-prob."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, name: str = "", limits: ServerLimits | None = None,
                 device: str | torch.device | None = None) -> None:
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
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        lim = self.limits
        return {"protocol": PROTOCOL_VERSION, "model": self.name, "tokenizer_hash": self.hash,
                "vocab_size": self.vocab_size, "max_batch_size": lim.max_batch_size,
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
        if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0 < float(tau) < float("inf"):
            raise RequestError(400, f"temperature={tau!r} must be a number > 0")
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
        return {"topk_ids": encode_array(torch.cat(ids)), "topk_logprobs": encode_array(torch.cat(logps)),
                "log_tail": encode_array(torch.cat(tails)), "token_logprobs": encode_array(torch.cat(tokens)),
                "lengths": [len(c) for c in completions]}

    def _rollout(self, prompts: list[list[int]], completions: list[list[int]]) -> Rollout:
        """Left-padded prompts, right-padded completions: the training batch layout (:func:`gkd.data.collate`)."""
        examples = [Example(prompt_ids=p, reference_ids=c, row={}) for p, c in zip(prompts, completions, strict=True)]
        return reference_rollout(collate(examples, self.pad_id)).to(self.device)


def create_app(service: TeacherService, api_key: str | None = None):
    """The FastAPI app: ``GET /health`` (no auth), ``GET /info`` and ``POST /score`` (bearer token when
    ``api_key`` is set). Every refusal is ``{"error": "one line"}`` with a 4xx status; the server
    keeps serving."""
    import json

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="gkd teacher", docs_url=None, redoc_url=None, openapi_url=None)

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

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
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > service.limits.max_body_bytes:
            return refuse(413, f"request body of {length} bytes; this server takes at most "
                               f"{service.limits.max_body_bytes} (send smaller batches)")
        body = await request.body()
        if len(body) > service.limits.max_body_bytes:
            return refuse(413, f"request body of {len(body)} bytes; this server takes at most "
                               f"{service.limits.max_body_bytes} (send smaller batches)")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return refuse(400, f"the body is not valid JSON: {str(e).splitlines()[0]}")
        try:
            from starlette.concurrency import run_in_threadpool

            return await run_in_threadpool(service.score, payload)
        except RequestError as e:
            return refuse(e.status, str(e))

    return app


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          dtype: str = "float32", device: str | None = None, limits: ServerLimits | None = None) -> None:
    """Load ``model`` (any name ``gkd train`` takes as a teacher) and serve it until interrupted."""
    import socket

    import uvicorn

    from gkd.errors import InputError
    from gkd.models import load_model, load_tokenizer, resolve_model

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # a busy port is one line, before the model loads
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e} (pick another --port)") from None
    path = resolve_model(model, role="teacher")
    tokenizer = load_tokenizer(path)
    net = load_model(path, dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device)
    service = TeacherService(net, tokenizer, name=model, limits=limits, device=device)
    print(f"gkd serve-teacher: {model} on http://{host}:{port} (vocabulary {service.vocab_size}, tokenizer "
          f"{service.hash[:12]}…, {'bearer token required' if api_key else 'no token'})", flush=True)
    uvicorn.run(create_app(service, api_key), host=host, port=port, log_level="warning")
