"""``gkd serve-teacher``: scores against an unpadded float64 forward, the wire format, and a bad-input
matrix that each gets a one-line 4xx while the server keeps serving (in-process and on loopback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_model

from gkd.serving.protocol import decode_array, encode_array, tokenizer_hash
from gkd.serving.server import RequestError, ServerLimits, TeacherService, create_app

SEQS = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14]), ([1, 2, 3, 4, 0], [3])]  # the built-in vocabulary: 15 tokens


def _request(k: int = 5, tau: float = 1.0, seqs=SEQS) -> dict:
    return {"sequences": [{"prompt_ids": p, "completion_ids": c} for p, c in seqs], "top_k": k, "temperature": tau}


def _decoded(response: dict) -> dict[str, torch.Tensor]:
    return {k: decode_array(response[k]) for k in ("topk_ids", "topk_logprobs", "log_tail", "token_logprobs")}


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return tiny_model(tokenizer, hidden=64, seed=5)


@pytest.mark.parametrize("chunk_tokens", [4, 4096])  # 4: one sequence per teacher forward
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_scores_equal_an_unpadded_float64_forward(tokenizer, teacher, chunk_tokens, tau):
    service = TeacherService(teacher, tokenizer, limits=ServerLimits(chunk_tokens=chunk_tokens, vocab_chunk=2))
    got = _decoded(service.score(_request(k=5, tau=tau)))
    assert service.score(_request(k=5, tau=tau))["lengths"] == [2, 4, 1]
    ref = tiny_model(tokenizer, hidden=64, seed=5).double()
    v = len(tokenizer)
    rows = []
    for p, c in SEQS:
        with torch.no_grad():
            logits = ref(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1, :v]
        for t, token in enumerate(c):
            scaled = torch.log_softmax(logits[t] / tau, -1)
            top, idx = scaled.topk(5)
            rest = torch.ones(v, dtype=torch.bool)
            rest[idx] = False
            rows.append((idx, top, torch.logsumexp(scaled[rest], -1), torch.log_softmax(logits[t], -1)[token]))
    assert got["topk_ids"].shape == (7, 5)
    torch.testing.assert_close(got["topk_ids"].long(), torch.stack([r[0] for r in rows]))
    torch.testing.assert_close(got["topk_logprobs"].double(), torch.stack([r[1] for r in rows]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["log_tail"].double(), torch.stack([r[2] for r in rows]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["token_logprobs"].double(), torch.stack([r[3] for r in rows]), rtol=1e-5, atol=1e-5)


def test_arrays_round_trip_bit_exact():
    x = torch.randn(3, 4) * 1e-30
    assert torch.equal(decode_array(encode_array(x)), x)
    i = torch.tensor([[0, 2**31 - 1], [-5, 7]], dtype=torch.int32)
    assert torch.equal(decode_array(encode_array(i)), i)
    with pytest.raises(ValueError, match="malformed"):
        decode_array({"dtype": "float32", "shape": [3], "data": "AAAA"})


def test_tokenizer_hash_tells_tokenizers_apart(tokenizer):
    import copy

    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<new>"])
    assert tokenizer_hash(tokenizer) == tokenizer_hash(copy.deepcopy(tokenizer))
    assert tokenizer_hash(tokenizer) != tokenizer_hash(other)


BAD = [  # (body, status, words the one-line reason must contain)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"sequences": [], "top_k": 3}', 400, "non-empty"),
    (b'{"sequences": [{"prompt_ids": [1], "completion_ids": [2]}], "top_k": 3, "extra": 1}', 400, "unknown field"),
    (b'{"sequences": [{"prompt_ids": [1], "completion_ids": [99999]}], "top_k": 3}', 400, "token id 99999"),
    (b'{"sequences": [{"prompt_ids": [-1], "completion_ids": [2]}], "top_k": 3}', 400, "token id -1"),
    (b'{"sequences": [{"prompt_ids": [1.5], "completion_ids": [2]}], "top_k": 3}', 400, "integer token ids"),
    (b'{"sequences": [{"prompt_ids": [1], "completion_ids": []}], "top_k": 3}', 400, "at least one"),
    (b'{"sequences": [{"prompt_ids": [1]}], "top_k": 3}', 400, "exactly"),
    (b'{"sequences": [{"prompt_ids": [1], "completion_ids": [2]}], "top_k": 0}', 400, "top_k=0"),
    (b'{"sequences": [{"prompt_ids": [1], "completion_ids": [2]}], "top_k": 100000}', 400, "top_k=100000"),
    (b'{"sequences": [{"prompt_ids": [1], "completion_ids": [2]}], "top_k": 3, "temperature": 0}', 400, "temperature"),
    (b'{"sequences": [{"prompt_ids": [1], "completion_ids": [2]}], "top_k": 3, "temperature": "hot"}', 400,
     "temperature"),
]


def test_bad_inputs_get_one_line_4xx_and_the_server_keeps_serving(tokenizer, teacher):
    from fastapi.testclient import TestClient

    limits = ServerLimits(max_batch_size=4, max_sequence_length=12, max_batch_tokens=30, max_body_bytes=4000)
    service = TeacherService(teacher, tokenizer, limits=limits)
    client = TestClient(create_app(service))
    too_long = {"sequences": [{"prompt_ids": [1] * 10, "completion_ids": [2] * 3}], "top_k": 3}
    too_many = {"sequences": [{"prompt_ids": [1], "completion_ids": [2]}] * 5, "top_k": 3}
    too_big = {"sequences": [{"prompt_ids": [1] * 6, "completion_ids": [2] * 5}] * 3, "top_k": 3}
    cases = [*BAD, (too_long, 413, "13 tokens"), (too_many, 413, "5 sequences"), (too_big, 413, "33 tokens"),
             (b"{" + b" " * 5000 + b"}", 413, "body")]
    for body, status, words in cases:
        kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
        r = client.post("/score", headers={"content-type": "application/json"}, **kwargs)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert words in error and "\n" not in error, error
        ok = client.post("/score", json=_request(k=3))  # still serving, still right
        assert ok.status_code == 200
    assert torch.equal(_decoded(ok.json())["token_logprobs"], _decoded(service.score(_request(k=3)))["token_logprobs"])
    info = client.get("/info").json()
    assert info["tokenizer_hash"] == tokenizer_hash(tokenizer) and info["vocab_size"] == len(tokenizer)


def test_bearer_token(tokenizer, teacher):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(TeacherService(teacher, tokenizer), api_key="s3cret"))
    assert client.get("/health").status_code == 200  # liveness needs no token
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = client.post("/score", json=_request(), headers=headers)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
        assert client.get("/info", headers=headers).status_code == 401
    assert client.post("/score", json=_request(), headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_validate_names_the_offending_value(tokenizer, teacher):
    service = TeacherService(teacher, tokenizer)
    with pytest.raises(RequestError, match=r"sequences\[1\]\.completion_ids holds token id 70000"):
        service.validate({"sequences": [{"prompt_ids": [1], "completion_ids": [2]},
                                        {"prompt_ids": [1], "completion_ids": [70000]}], "top_k": 2})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_on_loopback_and_refuses_a_busy_port(tmp_path):
    import httpx

    port = _free_port()
    env = {**os.environ, "GKD_TEACHER_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "gkd.cli", "serve-teacher", "builtin:tiny-teacher", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.3)
        headers = {"Authorization": "Bearer k"}
        info = httpx.get(f"http://127.0.0.1:{port}/info", headers=headers).json()
        assert info["model"] == "builtin:tiny-teacher"
        r = httpx.post(f"http://127.0.0.1:{port}/score", json=_request(k=2), headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["lengths"] == [2, 4, 1]
        busy = subprocess.run([sys.executable, "-m", "gkd.cli", "serve-teacher", "builtin:tiny-teacher", "--port",
                               str(port)], capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2
        assert busy.stderr.strip().count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
