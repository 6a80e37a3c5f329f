"""A stand-in for vLLM's OpenAI-compatible server (``vllm serve``), the parts a teacher client uses.

It serves vLLM's documented response schema on loopback from a small Hugging Face model:
``GET /v1/models`` (``data[].id``, ``max_model_len``), ``POST /tokenize`` (``tokens``, ``count``,
``max_model_len``) and ``POST /v1/completions`` with token-id prompts and ``prompt_logprobs: k``:
each choice's ``prompt_logprobs`` is ``None`` for the first prompt token, then per token a dict
keyed by token id (JSON: a string) of ``{"logprob", "rank", "decoded_token"}`` holding the top-k of
the raw (temperature-1) distribution at that position plus the token itself with its rank, as
vLLM V1 returns with its default ``logprobs_mode: raw_logprobs``. ``prompt_logprobs`` above
``max_logprobs`` (vLLM's ``--max-logprobs``, default 20) is refused with vLLM's 400 error body.
"""

# no ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at runtime

import time

import torch


def create_fake_vllm_app(model: torch.nn.Module, tokenizer, name: str = "teacher", max_model_len: int = 64,
                         max_logprobs: int = 20):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    model.eval()
    vocab = len(tokenizer)
    app.state.completions_calls = 0

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}},
                            status_code=status)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "vllm", "root": name, "max_model_len": max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await request.json()
        if body.get("model") != name:
            return error(f"The model `{body.get('model')}` does not exist.", 404)
        ids = tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True)).input_ids
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": None}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.completions_calls += 1
        if body.get("model") != name:
            return error(f"The model `{body.get('model')}` does not exist.", 404)
        k = body.get("prompt_logprobs")
        if k is not None and k > max_logprobs:
            return error(f"Requested prompt logprobs of {k}, which is greater than max allowed: {max_logprobs}")
        prompts = body["prompt"]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        choices = []
        for i, ids in enumerate(prompts):
            if len(ids) + body.get("max_tokens", 16) > max_model_len:
                return error(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                             f"{len(ids) + body.get('max_tokens', 16)} tokens.")
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :, :vocab].float(), -1)
            entries: list = [None]
            for j in range(1, len(ids)):
                row = logp[j - 1]
                order = torch.argsort(row, descending=True)
                chosen = {int(t): r + 1 for r, t in enumerate(order[:k].tolist())} if k else {}
                token = ids[j]
                chosen.setdefault(token, int((row > row[token]).sum()) + 1)
                entries.append({str(t): {"logprob": float(row[t]), "rank": rank,
                                         "decoded_token": tokenizer.decode([t])} for t, rank in chosen.items()})
            nxt = int(logp[-1].argmax())
            choices.append({"index": i, "text": tokenizer.decode([nxt]), "logprobs": None, "finish_reason": "length",
                            "stop_reason": None, "prompt_logprobs": entries if k is not None else None})
        used = sum(len(p) for p in prompts)
        return {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": choices, "usage": {"prompt_tokens": used, "completion_tokens": len(prompts),
                                              "total_tokens": used + len(prompts)}}

    return app
