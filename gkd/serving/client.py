"""``teacher: http://host:port``: a teacher served by ``gkd serve-teacher`` in another process.

:class:`RemoteTeacher` stands where a local teacher module would; :func:`gkd.scorer.score` asks it
for the top-k view of a rollout. Requests are split to the server's limits; a lost connection, a
timeout or a 5xx is retried with exponential backoff until ``timeout`` seconds have passed (a
restarted server is waited for, and the step goes on where it was: no step is lost or repeated,
because scoring has no side effects). A 4xx is the request's fault and fails at once with the
server's one-line reason.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch

from gkd.errors import InputError
from gkd.losses import TeacherTopK
from gkd.rollout import Rollout
from gkd.serving.protocol import PROTOCOL_VERSION, decode_array, tokenizer_hash

__all__ = ["RemoteTeacher", "TeacherServerError", "is_remote_teacher"]

logger = logging.getLogger("gkd")


class TeacherServerError(InputError):
    """The teacher server refused a request, or could not be reached within the timeout."""


def is_remote_teacher(name: str | None) -> bool:
    """Whether a ``teacher`` value names a served teacher (``http://`` or ``https://``)."""
    return isinstance(name, str) and name.startswith(("http://", "https://"))


class RemoteTeacher:
    """The client side of ``gkd serve-teacher``: ``score(rollout, k, τ)`` → (top-k view, token log-probs)."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 600.0,
                 first_backoff: float = 0.5, max_backoff: float = 10.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.timeout, self.first_backoff, self.max_backoff = timeout, first_backoff, max_backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # one request may take long (a big batch on a busy server); the overall budget is `timeout`
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(min(timeout, 300.0), connect=10.0))
        self.info: dict[str, Any] = {}
        self.requests = 0  # successful requests (benchmarks, tests)
        self.retries = 0

    @classmethod
    def from_config(cls, url: str, api_key_env: str = "GKD_TEACHER_API_KEY", timeout: float = 600.0) -> RemoteTeacher:
        return cls(url, api_key=os.environ.get(api_key_env) or None, timeout=timeout)

    def __repr__(self) -> str:
        return f"RemoteTeacher({self.url!r})"

    # --- transport --------------------------------------------------------------------------

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        deadline = time.monotonic() + self.timeout
        wait = self.first_backoff
        last = ""
        while True:
            try:
                response = self._client.request(method, self.url + path, json=payload)
            except httpx.TransportError as e:  # refused, reset, timed out: the server may be restarting
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if response.status_code < 400:
                    self.requests += 1
                    return response.json()
                reason = _reason(response)
                if response.status_code < 500:
                    raise TeacherServerError(f"teacher server {self.url} refused {path} ({response.status_code}): {reason}")
                last = f"HTTP {response.status_code}: {reason}"
            if time.monotonic() + wait > deadline:
                raise TeacherServerError(f"teacher server {self.url} did not answer {path} within {self.timeout:g} s "
                                         f"(last: {last}); is `gkd serve-teacher` running there? (teacher_timeout)")
            self.retries += 1
            logger.warning("teacher server %s: %s; retrying in %.1f s", self.url, last, wait)
            time.sleep(wait)
            wait = min(2 * wait, self.max_backoff)

    def connect(self, tokenizer) -> dict[str, Any]:
        """Fetch ``/info`` and refuse a server whose tokenizer is not the student's."""
        info = self._call("GET", "/info")
        if info.get("protocol") != PROTOCOL_VERSION:
            raise TeacherServerError(f"teacher server {self.url} speaks protocol {info.get('protocol')!r}; this gkd "
                                     f"speaks {PROTOCOL_VERSION}: run the same gkd version on both sides")
        mine = tokenizer_hash(tokenizer)
        if info.get("tokenizer_hash") != mine:
            raise TeacherServerError(
                f"teacher server {self.url} ({info.get('model')}) has another tokenizer (hash "
                f"{str(info.get('tokenizer_hash'))[:12]}… vs the student's {mine[:12]}…, vocabulary "
                f"{info.get('vocab_size')} vs {len(tokenizer)}): token-level distillation needs one tokenizer")
        self.info = info
        return info

    # --- scoring ----------------------------------------------------------------------------

    def _requests(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[int]]:
        """Consecutive groups of sequences within the server's batch limits."""
        max_seqs = int(self.info.get("max_batch_size", 256))
        max_tokens = int(self.info.get("max_batch_tokens", 1 << 30))
        groups: list[list[int]] = [[]]
        tokens = 0
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            n = len(p) + len(c)
            if groups[-1] and (len(groups[-1]) >= max_seqs or tokens + n > max_tokens):
                groups.append([])
                tokens = 0
            groups[-1].append(i)
            tokens += n
        return groups

    @torch.no_grad()
    def score(self, rollout: Rollout, topk: int, temperature: float = 1.0) -> tuple[TeacherTopK, torch.Tensor]:
        """The teacher's top-``topk`` view ``(B, L, k)`` at ``temperature`` and the log-prob ``(B, L)``
        of each completion token under the unprocessed teacher, on the rollout's device. Padded
        positions hold a uniform top-k (finite, masked out by every loss) and log-prob 0."""
        if not self.info:
            raise TeacherServerError(f"teacher server {self.url}: connect() first")
        k = min(topk, int(self.info.get("max_top_k", topk)))
        if k != topk:
            raise TeacherServerError(f"teacher_topk={topk} is above the teacher server's limit of {k} (max_top_k)")
        pm, cm = rollout.prompt_mask.cpu(), rollout.completion_mask.cpu()
        pids, cids = rollout.prompt_ids.cpu(), rollout.completion_ids.cpu()
        b, length = cids.shape
        prompts = [pids[i][pm[i]].tolist() for i in range(b)]
        completions = [cids[i][cm[i]].tolist() for i in range(b)]
        indices = torch.arange(k).expand(b, length, k).clone()
        logprobs = torch.full((b, length, k), -math.log(k))
        tail = torch.full((b, length), TeacherTopK.LOG_ZERO)
        tokens = torch.zeros((b, length))
        live = [i for i in range(b) if completions[i]]  # a row with no completion token needs no scores
        for group in self._requests([prompts[i] for i in live], [completions[i] for i in live]):
            rows = [live[j] for j in group]
            payload = {"sequences": [{"prompt_ids": prompts[i], "completion_ids": completions[i]} for i in rows],
                       "top_k": k, "temperature": float(temperature)}
            out = self._call("POST", "/score", payload)
            try:
                arrays = {name: decode_array(out[name]) for name in ("topk_ids", "topk_logprobs", "log_tail",
                                                                      "token_logprobs")}
                lengths = [int(n) for n in out["lengths"]]
            except (KeyError, TypeError, ValueError) as e:
                raise TeacherServerError(f"teacher server {self.url} sent a malformed /score response: {e}") from None
            if lengths != [len(completions[i]) for i in rows]:
                raise TeacherServerError(f"teacher server {self.url} answered for {lengths} positions, asked for "
                                         f"{[len(completions[i]) for i in rows]}")
            start = 0
            for i, n in zip(rows, lengths, strict=True):
                indices[i, :n] = arrays["topk_ids"][start : start + n].long()
                logprobs[i, :n] = arrays["topk_logprobs"][start : start + n]
                tail[i, :n] = arrays["log_tail"][start : start + n]
                tokens[i, :n] = arrays["token_logprobs"][start : start + n]
                start += n
        device = rollout.completion_ids.device
        return TeacherTopK(indices.to(device), logprobs.to(device), tail.to(device)), tokens.to(device)

    def close(self) -> None:
        self._client.close()


def _reason(response: Any) -> str:
    try:
        return str(response.json().get("error") or response.text).splitlines()[0][:300]
    except (ValueError, AttributeError):
        return (response.text or "").splitlines()[0][:300] if response.text else "no reason given"
