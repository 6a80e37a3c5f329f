"""``teacher: http://…``: training against ``gkd serve-teacher`` (on loopback) gives the local teacher's
per-step losses at the same top-k, survives a server restart mid-run, and refuses what it cannot do."""

from __future__ import annotations

import copy
import socket
import threading
import time

import pytest
import torch
from conftest import tiny_model

from gkd.config import ConfigError, GKDConfig
from gkd.errors import TeacherChangedError, TeacherUnavailableError
from gkd.serving.client import RemoteTeacher, TeacherServerError
from gkd.serving.server import TeacherService, uvicorn_config

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(12, 3), (4, 5), (40, 51), (7, 8), (33, 9),
                                                                       (61, 20), (5, 5), (18, 27)]]
TOL = dict(rel=2e-5, abs=1e-6)  # the server pads its own sub-batches: float32 sums in another order


class LoopbackServer:
    """``create_app`` served by uvicorn in a thread on 127.0.0.1; stop() / start() again on the same port."""

    def __init__(self, service: TeacherService | object, api_key: str | None = None) -> None:
        self.service, self.api_key = service, api_key  # a TeacherService, or a ready app
        self.app = None if isinstance(service, TeacherService) else service
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> LoopbackServer:
        import uvicorn

        config = (uvicorn_config(self.service, host="127.0.0.1", port=self.port, api_key=self.api_key, log_level="error")
                  if isinstance(self.service, TeacherService) else
                  uvicorn.Config(self.service, host="127.0.0.1", port=self.port, log_level="error"))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return tiny_model(tokenizer, hidden=64, seed=12)


@pytest.fixture(scope="module")
def server(tokenizer, teacher):
    srv = LoopbackServer(TeacherService(copy.deepcopy(teacher), tokenizer)).start()
    yield srv
    srv.stop()


def _train(tokenizer, tmp_path, name: str, teacher_model, trainer_cls=None, **overrides):
    from gkd.trainer import GKDTrainer

    fields = dict(teacher="local", student="unused", dataset="unused", per_device_batch_size=2, max_steps=4,
                  max_new_tokens=6, output_dir=str(tmp_path / name), progress_bar=False, save_final_model=False,
                  seed=3, teacher_topk=5, log_samples_steps=1, learning_rate=1e-3)
    cfg = GKDConfig(**{**fields, **overrides})
    cls = trainer_cls or GKDTrainer
    trainer = cls(cfg, student=tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11), tokenizer=tokenizer,
                  teacher=teacher_model, train_rows=ROWS)
    return trainer, trainer.train()


@pytest.mark.parametrize("algorithm", ["gkd", "minillm"])
def test_served_teacher_gives_the_local_teachers_losses(tokenizer, tmp_path, teacher, server, algorithm):
    extra = (dict(lmbda=0.5, divergence="jsd", beta=0.5) if algorithm == "gkd" else
             dict(algorithm="minillm", teacher_mix=0.0, num_rollouts=4, ppo_epochs=2, top_k=8))
    _, local = _train(tokenizer, tmp_path, "local", copy.deepcopy(teacher), **extra)
    remote_trainer, remote = _train(tokenizer, tmp_path, "remote", None, teacher=server.url, **extra)
    assert isinstance(remote_trainer.teacher, RemoteTeacher) and remote_trainer.teacher.requests > 0
    keys = ["loss"] + (["pg", "single_step", "token_reward_mean"] if algorithm == "minillm" else [])
    assert [h["on_policy"] for h in local] == [h["on_policy"] for h in remote]
    for a, b in zip(local, remote, strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], **TOL), (a["step"], key)
    samples = (tmp_path / "remote" / "samples.jsonl").read_text()
    assert "teacher_logprob_mean" in samples


def test_a_server_restart_mid_run_loses_and_repeats_no_step(tokenizer, tmp_path, teacher):
    from gkd.trainer import GKDTrainer

    srv = LoopbackServer(TeacherService(copy.deepcopy(teacher), tokenizer)).start()
    restarted = threading.Event()

    class Restarting(GKDTrainer):
        def log(self, metrics):
            super().log(metrics)
            if self.step == 2:  # the server goes down between steps 2 and 3 and is back 1.5 s later
                srv.stop()
                threading.Timer(1.5, lambda: (srv.start(), restarted.set())).start()

    try:
        _, plain = _train(tokenizer, tmp_path, "plain", copy.deepcopy(teacher), lmbda=1.0)
        trainer, history = _train(tokenizer, tmp_path, "restart", None, Restarting, teacher=srv.url, lmbda=1.0,
                                  log_samples_steps=0)
    finally:
        restarted.wait(timeout=30)
        srv.stop()
    assert restarted.is_set() and trainer.teacher.retries > 0
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for a, b in zip(plain, history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], **TOL)


def test_unreachable_server_and_other_tokenizer_are_one_line_errors(tokenizer, tmp_path, teacher):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TeacherUnavailableError, match=r"did not answer /info within 1 s .*gkd serve-teacher"):
        _train(tokenizer, tmp_path, "down", None, teacher=f"http://127.0.0.1:{port}", teacher_timeout=1.0)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra>"])
    srv = LoopbackServer(TeacherService(tiny_model(other, hidden=64, seed=12, vocab=len(other)), other)).start()
    try:
        with pytest.raises(TeacherServerError, match="another tokenizer"):
            _train(tokenizer, tmp_path, "other", None, teacher=srv.url)
    finally:
        srv.stop()


def test_bearer_token_from_the_environment(tokenizer, tmp_path, teacher, monkeypatch):
    srv = LoopbackServer(TeacherService(copy.deepcopy(teacher), tokenizer), api_key="s3cret").start()
    try:
        with pytest.raises(TeacherServerError, match="401.*bearer token"):
            _train(tokenizer, tmp_path, "nokey", None, teacher=srv.url, max_steps=1)
        monkeypatch.setenv("MY_KEY", "s3cret")
        _, history = _train(tokenizer, tmp_path, "key", None, teacher=srv.url, teacher_api_key_env="MY_KEY",
                            max_steps=1)
        assert len(history) == 1
    finally:
        srv.stop()


@pytest.mark.parametrize("fields, words", [
    (dict(teacher_topk=0), "set teacher_topk"),
    (dict(seq_kd=True), "seq_kd needs a local teacher"),
    (dict(algorithm="minillm", teacher_mix=0.2), "teacher_mix: 0"),
    (dict(student_init={"from": "teacher", "num_layers": 1}, student=""), "student_init"),
])
def test_what_a_served_teacher_cannot_do_is_refused(fields, words):
    base = dict(teacher="http://127.0.0.1:9", student="s", dataset="d", teacher_topk=5)
    with pytest.raises(ConfigError, match=words):
        GKDConfig(**{**base, **fields})


def test_client_splits_requests_to_the_servers_limits(tokenizer, teacher):
    from gkd.rollout import Rollout
    from gkd.scorer import score
    from gkd.serving.server import ServerLimits

    srv = LoopbackServer(TeacherService(copy.deepcopy(teacher), tokenizer,
                                        limits=ServerLimits(max_batch_size=2, max_batch_tokens=12))).start()
    try:
        client = RemoteTeacher(srv.url)
        client.connect(tokenizer)
        g = torch.Generator().manual_seed(0)
        prompt_ids = torch.randint(1, 14, (5, 4), generator=g)
        prompt_mask = torch.ones(5, 4, dtype=torch.bool)
        prompt_mask[0, :2] = False
        completion_ids = torch.randint(1, 14, (5, 3), generator=g)
        completion_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
        rollout = Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask)
        view, tokens = client.score(rollout, topk=4, temperature=1.0)
        assert client.requests == 1 + 3  # /info, then 4 live rows in requests of at most 2 rows / 12 tokens
        local = score(teacher, rollout, len(tokenizer), topk=4).teacher_logits
        m = completion_mask
        torch.testing.assert_close(view.logprobs[m], local.logprobs[m], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(view.indices[m], local.indices[m])
        full = torch.log_softmax(score(teacher, rollout, len(tokenizer)).teacher_logits, -1)
        torch.testing.assert_close(tokens[m], full.gather(-1, completion_ids[..., None])[..., 0][m], rtol=1e-5, atol=1e-5)
    finally:
        srv.stop()


def _spawn_server(port: int):
    import os
    import subprocess
    import sys

    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "gkd.cli", "serve-teacher", "builtin:tiny-teacher", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "GKD_TEACHER_API_KEY": ""})
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)


def test_cli_run_survives_a_killed_server_and_resumes_exactly(tmp_path):
    """`gkd train` against a `gkd serve-teacher` process that is SIGKILLed mid-run and started again:
    the run waits, loses and repeats no step, and equals a straight run; a run split by a checkpoint
    and resumed equals it too."""
    import json
    import signal

    from gkd.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["recipes/tiny.yaml", f"teacher=http://127.0.0.1:{port}", "teacher_topk=8", "lmbda=0.5", "teacher_timeout=120",
              "progress_bar=false", "save_final_model=false", "log_samples_steps=0"]

    def losses(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    server = _spawn_server(port)
    try:
        assert main(["train", *common, "max_steps=24", f"output_dir={tmp_path / 'straight'}"]) == 0
        assert main(["train", *common, "max_steps=12", "save_steps=12", f"output_dir={tmp_path / 'split'}"]) == 0
        assert main(["train", *common, "max_steps=24", "resume_from_checkpoint=latest",
                     f"output_dir={tmp_path / 'split'}"]) == 0
        codes: list[int] = []
        run = threading.Thread(target=lambda: codes.append(main(["train", *common, "max_steps=24",
                                                                 f"output_dir={tmp_path / 'killed'}"])),
                               daemon=True)
        run.start()
        metrics = tmp_path / "killed" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.time() < deadline and run.is_alive()
            time.sleep(0.02)
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = _spawn_server(port)
        run.join(timeout=300)
        assert codes == [0]
    finally:
        server.terminate()
        server.wait(timeout=30)
    straight = losses(tmp_path / "straight")
    assert [s for s, _ in straight] == list(range(1, 25))
    killed = losses(tmp_path / "killed")
    assert len(killed) == 24 and len(killed[-1]) == 2
    assert killed == straight and losses(tmp_path / "split") == straight


def _swapping_trainer(srv: LoopbackServer, replacement: TeacherService | object, swapped: threading.Event):
    """A trainer that, after step 2, stops ``srv`` and serves ``replacement`` on the same port."""
    from gkd.trainer import GKDTrainer

    class Swapping(GKDTrainer):
        def log(self, metrics):
            super().log(metrics)
            if self.step == 2:
                srv.stop()
                srv.service = replacement
                srv.app = None if isinstance(replacement, TeacherService) else replacement
                srv.start()
                swapped.set()

    return Swapping


@pytest.mark.parametrize("change", ["model", "tokenizer"])
def test_a_server_that_comes_back_as_another_teacher_stops_the_run(tokenizer, tmp_path, teacher, change):
    """Guards ``RemoteTeacher._verify_identity`` after every new connection: without it the run ends with
    exit 0 and losses from the wrong teacher."""
    first = TeacherService(copy.deepcopy(teacher), tokenizer)
    if change == "model":  # same tokenizer, other weights: only the model fingerprint tells them apart
        replacement = TeacherService(tiny_model(tokenizer, hidden=64, seed=13), tokenizer)
        words = "model_fingerprint"
    else:  # same fingerprint published, another tokenizer
        other = copy.deepcopy(tokenizer)
        other.add_tokens(["<extra>"])
        replacement = TeacherService(tiny_model(other, hidden=64, seed=12, vocab=len(other)), other,
                                     fingerprint=first.fingerprint)
        words = "tokenizer_hash"
    srv = LoopbackServer(first).start()
    swapped = threading.Event()
    try:
        with pytest.raises(TeacherChangedError, match=rf"answered as another teacher after a reconnect \({words}"):
            _train(tokenizer, tmp_path, "swap", None, _swapping_trainer(srv, replacement, swapped), teacher=srv.url,
                   lmbda=1.0, log_samples_steps=0)
    finally:
        srv.stop()
    assert swapped.is_set()


def test_cli_exit_code_when_the_served_teacher_changes(tokenizer, tmp_path, capsys):
    """`gkd train` against a server replaced mid-run by another model: one line on stderr, exit 76."""
    import json

    from gkd.cli import main
    from gkd.errors import TEACHER_CHANGED_EXIT_CODE
    from gkd.models import load_model, load_tokenizer, resolve_model

    path = resolve_model("builtin:tiny-teacher", role="teacher")
    tok = load_tokenizer(path)
    srv = LoopbackServer(TeacherService(load_model(path, "float32"), tok)).start()
    out = tmp_path / "run"
    swapped = threading.Event()

    def swap_after_two_steps() -> None:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.time() < deadline:
            time.sleep(0.02)
        srv.stop()
        srv.service = TeacherService(tiny_model(tok, hidden=64, seed=99), tok)
        srv.start()
        swapped.set()

    threading.Thread(target=swap_after_two_steps, daemon=True).start()
    try:
        code = main(["train", "recipes/tiny.yaml", f"teacher={srv.url}", "teacher_topk=8", "lmbda=1", "max_steps=200",
                     f"output_dir={out}", "progress_bar=false", "save_final_model=false", "log_samples_steps=0"])
    finally:
        swapped.wait(timeout=60)
        srv.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == TEACHER_CHANGED_EXIT_CODE == 76
    assert "answered as another teacher after a reconnect" in err[-1] and err[-1].startswith("gkd train: error:")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= len(steps) < 200


def test_teacher_topk_above_the_vocabulary_is_the_whole_distribution_locally_and_served(tokenizer, tmp_path, teacher,
                                                                                         server, caplog):
    """Local and served teachers both keep all V tokens for teacher_topk > V, with the same note."""
    import logging

    k = len(tokenizer) + 9
    with caplog.at_level(logging.INFO, logger="gkd"):
        _, local = _train(tokenizer, tmp_path, "local", copy.deepcopy(teacher), teacher_topk=k, lmbda=0.5, max_steps=3)
        notes_local = sum("is above the vocabulary" in r.getMessage() for r in caplog.records)
        _, remote = _train(tokenizer, tmp_path, "remote", None, teacher=server.url, teacher_topk=k, lmbda=0.5,
                           max_steps=3)
    notes = sum("is above the vocabulary" in r.getMessage() for r in caplog.records)
    assert notes_local == 1 and notes == 2
    for a, b in zip(local, remote, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], **TOL), a["step"]


def test_cli_exit_code_of_a_teacher_that_does_not_answer(tmp_path, capsys):
    """A teacher timeout is exit 69 (its own code), not 2 (bad input)."""
    from gkd.cli import main
    from gkd.errors import TEACHER_UNAVAILABLE_EXIT_CODE

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["train", "recipes/tiny.yaml", f"teacher=http://127.0.0.1:{port}", "teacher_topk=8", "teacher_timeout=1",
                 "max_steps=1", f"output_dir={tmp_path / 'run'}", "progress_bar=false", "save_final_model=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == TEACHER_UNAVAILABLE_EXIT_CODE == 69
    assert err[-1].startswith("gkd train: error: teacher server") and "did not answer /info within 1 s" in err[-1]
