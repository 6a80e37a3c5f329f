"""The teacher server's wire format, shared by ``gkd serve-teacher`` and its client.

``GET /info`` → ``{"protocol", "model", "model_fingerprint", "tokenizer_hash", "vocab_size",
"max_body_bytes", "max_batch_size", "max_sequence_length", "max_batch_tokens", "max_top_k"}``; the client
reads it again after every new connection and stops (exit 76) if ``model``, ``model_fingerprint`` or
``tokenizer_hash`` changed.

``POST /score`` with ``{"sequences": [{"prompt_ids": [...], "completion_ids": [...]}, ...],
"top_k": k, "temperature": τ}`` → per completion position (position ``t`` predicts completion token
``t``), all sequences' positions concatenated in order:

* ``topk_ids`` ``(N, k)`` int32 and ``topk_logprobs`` ``(N, k)`` float32: the teacher's ``k`` most
  likely tokens at temperature ``τ`` (:class:`gkd.losses.TeacherTopK`), ``log_tail`` ``(N,)``: the
  log-probability of all other tokens together;
* ``token_logprobs`` ``(N,)`` float32: log-prob of the token in the sequence under the unprocessed
  teacher (temperature 1), what MiniLLM's reward ``log p(y_t)`` uses;
* ``lengths``: completion positions per sequence.

Arrays travel as ``{"dtype", "shape", "data"}`` with ``data`` base64 of the little-endian bytes, so
values arrive bit-exact. Every answer other than a 200 is ``{"error": "one line"}`` (4xx: the
request's fault; 5xx / 503: retried by the client).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from typing import Any

import numpy as np
import torch

__all__ = ["PROTOCOL_VERSION", "decode_array", "encode_array", "padded_topk", "tokenizer_hash"]

PROTOCOL_VERSION = 1
_DTYPES = {"float32": (torch.float32, "<f4"), "int32": (torch.int32, "<i4")}


def encode_array(tensor: torch.Tensor) -> dict[str, Any]:
    """A float32 / int32 tensor as ``{"dtype", "shape", "data"}`` (base64, little-endian)."""
    name = {torch.float32: "float32", torch.int32: "int32"}.get(tensor.dtype)
    if name is None:
        raise ValueError(f"cannot encode dtype {tensor.dtype}; use float32 or int32")
    array = tensor.detach().cpu().contiguous().numpy().astype(_DTYPES[name][1], copy=False)
    return {"dtype": name, "shape": list(tensor.shape), "data": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_array(value: dict[str, Any]) -> torch.Tensor:
    """Inverse of :func:`encode_array`; a malformed value raises ``ValueError``."""
    try:
        torch_dtype, np_dtype = _DTYPES[value["dtype"]]
        shape = [int(n) for n in value["shape"]]
        raw = base64.b64decode(value["data"], validate=True)
        array = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed array in the teacher server's response: {e}") from None
    return torch.from_numpy(array.copy()).to(torch_dtype)


def tokenizer_hash(tokenizer) -> str:
    """SHA-256 of what token-level distillation needs to agree on: the vocabulary (token → id) and
    the EOS id (as :func:`gkd.scorer.check_tokenizers_match`)."""
    payload = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()), "eos": tokenizer.eos_token_id},
                         ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def padded_topk(b: int, length: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices, logprobs, log_tail)`` of shape ``(B, L, k)`` / ``(B, L)`` holding a uniform top-k at
    every position: finite filler for padded positions (every loss masks them), overwritten per row
    with the teacher's scores (from a server or a cache)."""
    from gkd.losses import TeacherTopK

    return (torch.arange(k).expand(b, length, k).clone(), torch.full((b, length, k), -math.log(k)),
            torch.full((b, length), TeacherTopK.LOG_ZERO))
