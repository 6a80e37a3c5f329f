"""vLLM's OpenAI-compatible server as a teacher (``teacher: http://…`` pointing at ``vllm serve``),
tested against a loopback stand-in serving vLLM's documented response schema (``fake_vllm_server``)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from fake_vllm_server import create_fake_vllm_app
from test_served_teacher import LoopbackServer, _train

from gkd.serving.client import RemoteTeacher, TeacherServerError


def _serve(app) -> LoopbackServer:
    return LoopbackServer(app).start()


@pytest.fixture
def teacher(tokenizer):
    return tiny_model(tokenizer, hidden=64, seed=12)


@pytest.mark.parametrize("algorithm", ["gkd", "minillm"])
def test_vllm_teacher_gives_the_local_teachers_losses(tokenizer, tmp_path, teacher, algorithm):
    srv = _serve(create_fake_vllm_app(copy.deepcopy(teacher), tokenizer))
    try:
        extra = (dict(lmbda=0.5, divergence="jsd", beta=0.5) if algorithm == "gkd" else
                 dict(algorithm="minillm", teacher_mix=0.0, num_rollouts=4, ppo_epochs=2))
        _, local = _train(tokenizer, tmp_path, "local", copy.deepcopy(teacher), **extra)
        trainer, remote = _train(tokenizer, tmp_path, "vllm", None, teacher=srv.url, **extra)
        assert trainer.teacher.backend == "vllm" and srv.app.state.completions_calls > 0
        keys = ["loss"] + (["pg", "single_step", "token_reward_mean"] if algorithm == "minillm" else [])
        for a, b in zip(local, remote, strict=True):
            for key in keys:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    finally:
        srv.stop()


def test_vllm_scores_equal_a_local_topk_view(tokenizer, teacher):
    from gkd.rollout import Rollout
    from gkd.scorer import score

    srv = _serve(create_fake_vllm_app(copy.deepcopy(teacher), tokenizer))
    try:
        client = RemoteTeacher(srv.url)
        client.connect(tokenizer)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, 14, (3, 4), generator=g)
        comp = torch.randint(1, 14, (3, 5), generator=g)
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
        rollout = Rollout(ids, torch.ones(3, 4, dtype=torch.bool), comp, mask)
        view, tokens = client.score(rollout, topk=4)
        local = score(teacher, rollout, len(tokenizer), topk=4).teacher_logits
        torch.testing.assert_close(view.indices[mask], local.indices[mask])
        torch.testing.assert_close(view.logprobs[mask], local.logprobs[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(view.log_tail[mask], local.log_tail[mask], rtol=1e-4, atol=1e-5)
        full = torch.log_softmax(score(teacher, rollout, len(tokenizer)).teacher_logits, -1)
        torch.testing.assert_close(tokens[mask], full.gather(-1, comp[..., None])[..., 0][mask], rtol=1e-5, atol=1e-5)
        with pytest.raises(TeacherServerError, match="temperature"):
            client.score(rollout, topk=4, temperature=2.0)
    finally:
        srv.stop()


def test_vllm_refusals_are_one_line(tokenizer, teacher):
    srv = _serve(create_fake_vllm_app(copy.deepcopy(teacher), tokenizer, max_logprobs=3, max_model_len=12))
    try:
        client = RemoteTeacher(srv.url)
        client.connect(tokenizer)
        from gkd.rollout import Rollout

        short = Rollout(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool),
                        torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))
        with pytest.raises(TeacherServerError, match=r"refused /v1/completions \(400\): Requested prompt logprobs of 5"):
            client.score(short, topk=5)
        long = Rollout(torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool),
                       torch.ones(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.bool))
        with pytest.raises(TeacherServerError, match="max_model_len 12"):
            client.score(long, topk=2)
    finally:
        srv.stop()
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<x>"])
    srv = _serve(create_fake_vllm_app(tiny_model(other, hidden=64, seed=1, vocab=len(other)), other))
    try:  # the built-in tokenizer splits text into characters; the other one maps "<x>"-like text differently
        client = RemoteTeacher(srv.url)
        import gkd.serving.client as c

        probe = c._TOKENIZER_PROBE
        try:
            c._TOKENIZER_PROBE = probe + "<x>"
            with pytest.raises(TeacherServerError, match="tokenizes a probe text differently"):
                client.connect(tokenizer)
        finally:
            c._TOKENIZER_PROBE = probe
    finally:
        srv.stop()


@pytest.mark.parametrize("change", ["model", "tokenizer"])
def test_a_vllm_server_that_comes_back_as_another_model_stops_the_run(tokenizer, tmp_path, teacher, change):
    import threading

    from test_served_teacher import _swapping_trainer

    from gkd.errors import TeacherChangedError

    srv = _serve(create_fake_vllm_app(copy.deepcopy(teacher), tokenizer, name="teacher-a"))
    if change == "model":
        replacement, words = create_fake_vllm_app(copy.deepcopy(teacher), tokenizer, name="teacher-b"), \
            "model teacher-a → teacher-b"
    else:  # the same model name, a tokenizer that splits the probe text differently
        other = copy.deepcopy(tokenizer)
        other.add_tokens(["The"])
        replacement, words = create_fake_vllm_app(copy.deepcopy(teacher), other, name="teacher-a"), \
            "the tokenizer probe tokenizes differently"
    swapped = threading.Event()
    try:
        with pytest.raises(TeacherChangedError, match=words):
            _train(tokenizer, tmp_path, "swap", None, _swapping_trainer(srv, replacement, swapped), teacher=srv.url,
                   lmbda=1.0, log_samples_steps=0)
    finally:
        srv.stop()
    assert swapped.is_set()
