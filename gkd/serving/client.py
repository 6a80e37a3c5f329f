"""``teacher: http://host:port``: a teacher served in another process, by ``gkd serve-teacher`` or
by vLLM's OpenAI-compatible server (``vllm serve TEACHER``).

:class:`RemoteTeacher` stands where a local teacher module would; :func:`gkd.scorer.score` asks it
for the top-k view of a rollout. ``connect`` asks ``GET /info`` (gkd's server); where that is not
found it asks ``GET /v1/models`` and speaks vLLM's ``/v1/completions`` with ``prompt_logprobs``
instead: the top-k of the teacher's raw distribution at every prompt position plus the token in the
sequence, from which the tail bucket is ``log(1 − Σ top-k)`` (exact top-k; the tail to float
precision; temperature 1 only, as vLLM's prompt log-probs are raw). Requests are split to the server's limits; a lost connection, a
timeout or a 5xx is retried with exponential backoff until ``timeout`` seconds have passed (a
restarted server is waited for, and the step goes on where it was: no step is lost or repeated,
because scoring has no side effects); then :class:`gkd.errors.TeacherUnavailableError` (exit 69). A
4xx is the request's fault and fails at once with the server's one-line reason (exit 2).

Whenever the client opens a new connection (a restarted server, an expired keep-alive) it asks the
server who it is again before using its answer (``/info``'s model fingerprint and tokenizer hash;
vLLM: the model id and the tokenizer probe) and stops with :class:`gkd.errors.TeacherChangedError`
(exit 76) when another teacher answers: a server restarted with another model on the same port
would otherwise train the student against the wrong teacher without a word.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch

from gkd.errors import InputError, TeacherChangedError, TeacherUnavailableError
from gkd.losses import TeacherTopK
from gkd.rollout import Rollout
from gkd.serving.protocol import PROTOCOL_VERSION, decode_array, padded_topk, tokenizer_hash

__all__ = ["RemoteTeacher", "TeacherServerError", "is_remote_teacher"]

logger = logging.getLogger("gkd")


class TeacherServerError(InputError):
    """The teacher server refused a request (a 4xx) or is not a teacher this run can use (exit 2)."""


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
        self.backend = ""  # "gkd" (gkd serve-teacher) or "vllm" (vLLM's OpenAI-compatible server), set by connect
        self.requests = 0  # successful requests (benchmarks, tests)
        self.retries = 0
        self.identity_checks = 0  # identity re-checks after new connections (tests)
        self._new_connection = False  # set by httpcore's trace when a TCP connection is opened
        self._probe_ids: list[int] = []  # vLLM: the student tokenizer's ids of the probe text

    @classmethod
    def from_config(cls, url: str, api_key_env: str = "GKD_TEACHER_API_KEY", timeout: float = 600.0) -> RemoteTeacher:
        return cls(url, api_key=os.environ.get(api_key_env) or None, timeout=timeout)

    def __repr__(self) -> str:
        return f"RemoteTeacher({self.url!r})"

    # --- transport --------------------------------------------------------------------------

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            self._new_connection = True

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None,
              missing_ok: bool = False, verify: bool = True) -> dict[str, Any] | None:
        import httpx

        deadline = time.monotonic() + self.timeout
        wait = self.first_backoff
        last = ""
        while True:
            try:
                response = self._client.request(method, self.url + path, json=payload,
                                                extensions={"trace": self._trace})
            except httpx.TransportError as e:  # refused, reset, timed out: the server may be restarting
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if verify and self._new_connection and self.backend and response.status_code < 500:
                    self._verify_identity()  # a new connection may reach another server: ask who answered
                if response.status_code < 400:
                    self.requests += 1
                    try:
                        return response.json()
                    except ValueError:
                        raise TeacherServerError(f"teacher server {self.url} answered {path} with a body that is "
                                                 "not JSON") from None
                if response.status_code == 404 and missing_ok:
                    return None
                reason = _reason(response)
                if response.status_code < 500:
                    raise TeacherServerError(f"teacher server {self.url} refused {path} ({response.status_code}): {reason}")
                last = f"HTTP {response.status_code}: {reason}"
            if time.monotonic() + wait > deadline:
                raise TeacherUnavailableError(
                    f"teacher server {self.url} did not answer {path} within {self.timeout:g} s (last: {last}); is "
                    "`gkd serve-teacher` or `vllm serve` running there? (teacher_timeout)")
            self.retries += 1
            logger.warning("teacher server %s: %s; retrying in %.1f s", self.url, last, wait)
            time.sleep(wait)
            wait = min(2 * wait, self.max_backoff)

    def connect(self, tokenizer) -> dict[str, Any]:
        """Find out which server this is and refuse one whose tokenizer is not the student's."""
        info = self._call("GET", "/info", missing_ok=True)
        if info is None:
            models = self._call("GET", "/v1/models", missing_ok=True)
            if not models or not models.get("data"):
                raise TeacherServerError(f"{self.url} answers neither /info (gkd serve-teacher) nor /v1/models (vLLM): "
                                         "not a teacher server")
            return self._connect_vllm(models["data"][0], tokenizer)
        if info.get("protocol") != PROTOCOL_VERSION:
            raise TeacherServerError(f"teacher server {self.url} speaks protocol {info.get('protocol')!r}; this gkd "
                                     f"speaks {PROTOCOL_VERSION}: run the same gkd version on both sides")
        mine = tokenizer_hash(tokenizer)
        if info.get("tokenizer_hash") != mine:
            raise TeacherServerError(
                f"teacher server {self.url} ({info.get('model')}) has another tokenizer (hash "
                f"{str(info.get('tokenizer_hash'))[:12]}… vs the student's {mine[:12]}…, vocabulary "
                f"{info.get('vocab_size')} vs {len(tokenizer)}): token-level distillation needs one tokenizer")
        self.info, self.backend = info, "gkd"
        self._new_connection = False
        return info

    def _verify_identity(self) -> None:
        """After a new connection: refuse a server that now serves another model or tokenizer."""
        self._new_connection = False
        self.identity_checks += 1
        if self.backend == "vllm":
            models = self._call("GET", "/v1/models", verify=False) or {}
            name = str((models.get("data") or [{}])[0].get("id"))
            theirs = self._call("POST", "/tokenize", {"model": name, "prompt": _TOKENIZER_PROBE,
                                                      "add_special_tokens": False}, verify=False) or {}
            changed = [f"model {self.info['model']} → {name}"] if name != self.info["model"] else []
            if theirs.get("tokens") != self._probe_ids:
                changed.append("the tokenizer probe tokenizes differently")
        else:
            info = self._call("GET", "/info", verify=False) or {}
            changed = [f"{key} {str(self.info.get(key))[:16]}… → {str(info.get(key))[:16]}…"
                       for key in ("model_fingerprint", "tokenizer_hash") if info.get(key) != self.info.get(key)]
            if info.get("model") != self.info.get("model"):
                changed.insert(0, f"model {self.info.get('model')} → {info.get('model')}")
        if changed:
            raise TeacherChangedError(
                f"teacher server {self.url} answered as another teacher after a reconnect ({'; '.join(changed)}): "
                "stopped so that no step is scored by it; serve the original teacher again and resume from the "
                "last checkpoint (resume_from_checkpoint=latest)")

    def _connect_vllm(self, model: dict[str, Any], tokenizer) -> dict[str, Any]:
        """vLLM has no tokenizer hash: tokenize a probe text on both sides and compare the ids."""
        name = str(model.get("id"))
        probe = _TOKENIZER_PROBE
        mine = tokenizer(probe, add_special_tokens=False, verbose=False).input_ids
        theirs = self._call("POST", "/tokenize", {"model": name, "prompt": probe, "add_special_tokens": False})
        if not theirs or theirs.get("tokens") != mine:
            raise TeacherServerError(f"vLLM server {self.url} ({name}) tokenizes a probe text differently from the "
                                     "student's tokenizer: token-level distillation needs one tokenizer")
        self.info = {"model": name, "max_model_len": model.get("max_model_len"), "max_batch_size": 64,
                     "max_batch_tokens": 65536, "vocab_size": len(tokenizer)}
        self.backend, self._probe_ids, self._new_connection = "vllm", mine, False
        return self.info

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
        k = min(topk, int(self.info.get("vocab_size", topk)))  # above the vocabulary: all of it, as a local teacher
        if k > int(self.info.get("max_top_k", k)):
            raise TeacherServerError(f"teacher_topk={topk} is above the teacher server's limit of "
                                     f"{self.info['max_top_k']} (its max_top_k): lower teacher_topk")
        if self.backend == "vllm" and temperature != 1.0:
            raise TeacherServerError(f"a vLLM teacher returns its raw log-probs (temperature 1); loss temperature "
                                     f"{temperature:g} needs gkd serve-teacher or a local teacher")
        pm, cm = rollout.prompt_mask.cpu(), rollout.completion_mask.cpu()
        pids, cids = rollout.prompt_ids.cpu(), rollout.completion_ids.cpu()
        b, length = cids.shape
        prompts = [pids[i][pm[i]].tolist() for i in range(b)]
        completions = [cids[i][cm[i]].tolist() for i in range(b)]
        indices, logprobs, tail = padded_topk(b, length, k)
        tokens = torch.zeros((b, length))
        live = [i for i in range(b) if completions[i]]  # a row with no completion token needs no scores
        for group in self._requests([prompts[i] for i in live], [completions[i] for i in live]):
            rows = [live[j] for j in group]
            if self.backend == "vllm":
                arrays, lengths = self._score_vllm([prompts[i] for i in rows], [completions[i] for i in rows], k)
            else:
                arrays, lengths = self._score_gkd([prompts[i] for i in rows], [completions[i] for i in rows], k,
                                                  temperature)
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

    def _score_gkd(self, prompts: list[list[int]], completions: list[list[int]], k: int, temperature: float,
                   ) -> tuple[dict[str, torch.Tensor], list[int]]:
        payload = {"sequences": [{"prompt_ids": p, "completion_ids": c} for p, c in zip(prompts, completions, strict=True)],
                   "top_k": k, "temperature": float(temperature)}
        out = self._call("POST", "/score", payload)
        try:
            arrays = {name: decode_array(out[name]) for name in ("topk_ids", "topk_logprobs", "log_tail",  # type: ignore[index]
                                                                  "token_logprobs")}
            return arrays, [int(n) for n in out["lengths"]]  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as e:
            raise TeacherServerError(f"teacher server {self.url} sent a malformed /score response: {e}") from None

    def _score_vllm(self, prompts: list[list[int]], completions: list[list[int]], k: int,
                    ) -> tuple[dict[str, torch.Tensor], list[int]]:
        """``/v1/completions`` with the whole sequences as prompts and ``prompt_logprobs: k``: entry ``j``
        of a choice's ``prompt_logprobs`` is ``{token id: {logprob, rank, …}}`` for the distribution that
        predicts token ``j`` (its top-k plus the token itself)."""
        limit = self.info.get("max_model_len")
        for p, c in zip(prompts, completions, strict=True):
            if limit and len(p) + len(c) > int(limit):
                raise TeacherServerError(f"a sequence of {len(p) + len(c)} tokens is over the vLLM server's "
                                         f"max_model_len {limit}")
        payload = {"model": self.info["model"], "prompt": [p + c for p, c in zip(prompts, completions, strict=True)],
                   "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
        out = self._call("POST", "/v1/completions", payload)
        ids, logps, tails, tokens = [], [], [], []
        try:
            choices = sorted(out["choices"], key=lambda ch: int(ch["index"]))  # type: ignore[index]
            if len(choices) != len(prompts):
                raise ValueError(f"{len(choices)} choices for {len(prompts)} prompts")
            for choice, p, c in zip(choices, prompts, completions, strict=True):
                positions = choice["prompt_logprobs"]
                if len(positions) != len(p) + len(c):
                    raise ValueError(f"{len(positions)} prompt_logprobs entries for {len(p) + len(c)} tokens")
                for j, token in enumerate(c, start=len(p)):
                    entries = {int(t): v for t, v in positions[j].items()}
                    ranked = sorted(entries.items(), key=lambda kv: (kv[1].get("rank") or 1 << 30, -kv[1]["logprob"]))
                    top = [(t, float(v["logprob"])) for t, v in ranked[:k]]
                    if len(top) < k or token not in entries:
                        raise ValueError(f"position {j} has {len(entries)} entries without the sequence token or "
                                         f"fewer than top_k={k} (start vllm serve with --max-logprobs {k} or more)")
                    top_lp = torch.tensor([lp for _, lp in top], dtype=torch.float64)
                    mass = float(torch.logsumexp(top_lp, 0).exp().clamp(max=1.0))
                    ids.append([t for t, _ in top])
                    logps.append(top_lp.tolist())
                    tails.append(max(math.log1p(-mass) if mass < 1.0 else -math.inf, TeacherTopK.LOG_ZERO))
                    tokens.append(float(entries[token]["logprob"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TeacherServerError(f"vLLM server {self.url} sent an unexpected /v1/completions response: {e}") from None
        arrays = {"topk_ids": torch.tensor(ids, dtype=torch.int32).reshape(-1, k),
                  "topk_logprobs": torch.tensor(logps, dtype=torch.float32).reshape(-1, k),
                  "log_tail": torch.tensor(tails, dtype=torch.float32), "token_logprobs": torch.tensor(tokens)}
        return arrays, [len(c) for c in completions]

    def close(self) -> None:
        self._client.close()


#: Text tokenized on both sides to check a vLLM teacher's tokenizer (letters, digits, spaces, punctuation,
#: accents, CJK, an emoji, newlines: what byte-level BPE vocabularies tend to split differently).
_TOKENIZER_PROBE = "The quick brown fox: 12 + 345 = 357.\n  Ça coûte 3,50 €! 中文 🙂 <tag> x_y-z\tend"


def _reason(response: Any) -> str:
    try:
        body = response.json()
        error = body.get("error") or body.get("message") or response.text  # gkd: {"error": str}; vLLM: {"error": {...}}
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error).splitlines()[0][:300]
    except (ValueError, AttributeError):
        return (response.text or "").splitlines()[0][:300] if response.text else "no reason given"
