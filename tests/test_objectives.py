"""DKD, logit MSE, hidden-state and attention distillation, temperature schedules and weighted
objective lists: float64 brute-force references, the DKD identity, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gkd.config import ConfigError, GKDConfig, InputError
from gkd.losses import (
    attention_kl_per_token,
    distillation_loss_per_token,
    dkd_per_token,
    forward_kl,
    hidden_cosine_per_token,
    hidden_mse_per_token,
    log_probs,
    logit_mse_per_token,
)
from gkd.objectives import (
    HiddenProjection,
    Objective,
    default_layer_map,
    objective_terms,
    parse_objectives,
    resolve_layer_map,
    temperature_at,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def _logits(seed: int, shape=(2, 3, 7), scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _softmax64(row: list[float], tau: float) -> list[float]:
    z = [x / tau for x in row]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    return [x / s for x in e]


def _dkd_brute(s_row, t_row, y, tau, a, b) -> tuple[float, float, float]:
    """(TCKD, NCKD, α·TCKD + β·NCKD scaled by τ²) with plain float64 loops."""
    p, q = _softmax64(t_row, tau), _softmax64(s_row, tau)
    bt, bs = [p[y], 1 - p[y]], [q[y], 1 - q[y]]
    tckd = sum(x * math.log(x / z) for x, z in zip(bt, bs, strict=True) if x > 0)
    nckd = 0.0
    for v in range(len(p)):
        if v != y and p[v] > 0:
            ph, qh = p[v] / (1 - p[y]), q[v] / (1 - q[y])
            nckd += ph * math.log(ph / qh)
    return tckd, nckd, tau**2 * (a * tckd + b * nckd)


@pytest.mark.parametrize("tau,a,b", [(1.0, 1.0, 1.0), (2.0, 1.0, 8.0), (0.7, 0.5, 0.25)])
def test_dkd_matches_float64_brute_force(tau, a, b):
    s, t = _logits(0), _logits(1)
    y = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(2))
    got = dkd_per_token(s, t, y, alpha=a, beta=b, temperature=tau)
    for i in range(2):
        for j in range(3):
            ref = _dkd_brute(s[i, j].double().tolist(), t[i, j].double().tolist(), int(y[i, j]), tau, a, b)[2]
            assert got[i, j].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_dkd_identity_tckd_plus_weighted_nckd_is_kl():
    """DKD paper eq. 4: KL(p‖q) = TCKD + (1 − p_y)·NCKD, at any temperature."""
    for tau in (1.0, 2.5):
        s, t = _logits(3, (4, 5, 11)), _logits(4, (4, 5, 11))
        y = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(5))
        tckd = dkd_per_token(s, t, y, alpha=1.0, beta=0.0, temperature=tau) / tau**2
        nckd = dkd_per_token(s, t, y, alpha=0.0, beta=1.0, temperature=tau) / tau**2
        p_y = log_probs(t, tau).exp().gather(-1, y[..., None]).squeeze(-1)
        kl = forward_kl(log_probs(s, tau), log_probs(t, tau))
        torch.testing.assert_close(tckd + (1 - p_y) * nckd, kl, rtol=1e-5, atol=1e-6)


def test_dkd_is_finite_when_the_teacher_is_certain_of_the_target():
    s = _logits(6, (1, 2, 5)).requires_grad_(True)
    t = torch.zeros(1, 2, 5)
    t[..., 2] = 200.0  # p_y == 1 in fp32
    y = torch.full((1, 2), 2)
    loss = dkd_per_token(s, t, y, alpha=1.0, beta=8.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()


def test_dkd_gradient_matches_float64_autograd():
    s, t = _logits(7, (2, 2, 6)), _logits(8, (2, 2, 6))
    y = torch.tensor([[0, 3], [5, 1]])
    s32, s64 = s.clone().requires_grad_(True), s.double().requires_grad_(True)
    dkd_per_token(s32, t, y, alpha=1.0, beta=2.0, temperature=1.5).sum().backward()
    dkd_per_token(s64, t.double(), y, alpha=1.0, beta=2.0, temperature=1.5).sum().backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


def test_logit_mse_matches_brute_force_and_masks_like_the_rest():
    s, t = _logits(9), _logits(10)
    got = logit_mse_per_token(s, t)
    for i in range(2):
        for j in range(3):
            ref = sum((float(a) - float(b)) ** 2 for a, b in zip(s[i, j].double(), t[i, j].double(), strict=True)) / 7
            assert got[i, j].item() == pytest.approx(ref, rel=1e-6)
    via_name = distillation_loss_per_token(s, t, divergence="logit_mse")
    torch.testing.assert_close(via_name, got)


def test_hidden_losses_match_brute_force_with_projection():
    g = torch.Generator().manual_seed(11)
    hs, ht = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 6, generator=g)
    proj = HiddenProjection([1], 4, 6)
    w = proj.maps["1"].weight.detach().double()  # (6, 4)
    projected = proj(1, hs)
    mse, cos = hidden_mse_per_token(projected, ht), hidden_cosine_per_token(projected, ht)
    for i in range(2):
        for j in range(3):
            a = [sum(float(w[o, k]) * float(hs[i, j, k]) for k in range(4)) for o in range(6)]
            b = [float(x) for x in ht[i, j].double()]
            assert mse[i, j].item() == pytest.approx(sum((x - z) ** 2 for x, z in zip(a, b, strict=True)) / 6, rel=1e-5)
            dot = sum(x * z for x, z in zip(a, b, strict=True))
            norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(z * z for z in b))
            assert cos[i, j].item() == pytest.approx(1 - dot / norm, rel=1e-5, abs=1e-6)
    assert HiddenProjection([1], 6, 6).identity and not list(HiddenProjection([1], 6, 6).parameters())


def test_attention_kl_matches_brute_force_including_padded_keys():
    g = torch.Generator().manual_seed(12)
    logits_t, logits_s = torch.randn(1, 2, 3, 5, generator=g), torch.randn(1, 2, 3, 5, generator=g)
    logits_t[..., 0] = float("-inf")  # a padded key: probability exactly 0 for the teacher
    at, as_ = logits_t.softmax(-1), logits_s.softmax(-1)
    got = attention_kl_per_token(as_, at)
    for j in range(3):
        per_head = []
        for h in range(2):
            p, q = at[0, h, j].double().tolist(), as_[0, h, j].double().tolist()
            per_head.append(sum(x * math.log(x / z) for x, z in zip(p, q, strict=True) if x > 0))
        assert got[0, j].item() == pytest.approx(sum(per_head) / 2, rel=1e-5, abs=1e-7)
    assert torch.allclose(attention_kl_per_token(at, at), torch.zeros(1, 3), atol=1e-6)


def test_temperature_squared_scales_the_divergences_only_when_asked():
    s, t = _logits(13), _logits(14)
    plain = distillation_loss_per_token(s, t, divergence="jsd", beta=0.3, temperature=2.0)
    scaled = distillation_loss_per_token(s, t, divergence="jsd", beta=0.3, temperature=2.0, temperature_squared=True)
    torch.testing.assert_close(scaled, 4.0 * plain)


def test_temperature_schedules():
    assert temperature_at(5, 11, 4.0, None, "constant") == 4.0
    assert temperature_at(0, 11, 4.0, 1.0, "linear") == 4.0
    assert temperature_at(5, 11, 4.0, 1.0, "linear") == pytest.approx(2.5)
    assert temperature_at(10, 11, 4.0, 1.0, "linear") == pytest.approx(1.0)
    assert temperature_at(0, 11, 4.0, 1.0, "cosine") == pytest.approx(4.0)
    assert temperature_at(5, 11, 4.0, 1.0, "cosine") == pytest.approx(2.5)
    assert temperature_at(10, 11, 4.0, 1.0, "cosine") == pytest.approx(1.0)
    assert temperature_at(2, 11, 4.0, 1.0, "cosine") > temperature_at(2, 11, 4.0, 1.0, "linear")  # slow start
    with pytest.raises(ConfigError, match="needs loss_temperature_end"):
        GKDConfig(student="s", teacher="t", loss_temperature_schedule="linear")


def test_parse_objectives_grammar_and_errors():
    objs = parse_objectives(["0.7*jsd(beta=0.5) + 0.3*hidden_mse", "dkd(dkd_beta=8)", "1e-1*logit_mse"])
    assert objs == [Objective("jsd", 0.7, {"beta": 0.5}), Objective("hidden_mse", 0.3),
                    Objective("dkd", 1.0, {"dkd_beta": 8.0}), Objective("logit_mse", 0.1)]
    assert [o.label for o in objs] == ["jsd(beta=0.5)", "hidden_mse", "dkd(dkd_beta=8)", "logit_mse"]
    for bad, msg in [("0.5*hiden_mse", "did you mean 'hidden_mse'"), ("jsd(skew=0.1)", "not one of jsd's"),
                     ("jsd(beta=x)", "is not a number"), ("0.5 jsd", "must look like"), ("-1*jsd", ">= 0")]:
        with pytest.raises(ConfigError, match=msg):
            parse_objectives([bad])


def test_layer_maps():
    assert default_layer_map(2, 4) == {1: 2, 2: 4}
    assert default_layer_map(3, 12) == {1: 4, 2: 8, 3: 12}
    assert resolve_layer_map({2: 3, 0: 0}, 2, 4) == {0: 0, 2: 3}
    with pytest.raises(ConfigError, match="teacher layer 9"):
        resolve_layer_map({1: 9}, 2, 4)
    assert GKDConfig(student="s", teacher="t", layer_map="1:2, 2:4").layer_map == {1: 2, 2: 4}
    with pytest.raises(ConfigError, match="layer_map"):
        GKDConfig(student="s", teacher="t", layer_map="1-2")


def test_objective_terms_weighted_sum_and_per_objective_params():
    s, t = _logits(15), _logits(16)
    ids = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(17))
    objs = parse_objectives(["0.6*jsd(beta=0.9)", "0.4*dkd", "2*logit_mse"])
    defaults = {"beta": 0.1, "skew": 0.1, "kd_weight": 0.5, "dkd_alpha": 1.0, "dkd_beta": 3.0}
    terms = objective_terms(objs, student_logits=s, teacher_logits=t, completion_ids=ids, on_policy=True,
                            defaults=defaults, temperature=1.0)
    torch.testing.assert_close(terms["jsd(beta=0.9)"], distillation_loss_per_token(s, t, divergence="jsd", beta=0.9))
    torch.testing.assert_close(terms["dkd"], dkd_per_token(s, t, ids, alpha=1.0, beta=3.0))
    torch.testing.assert_close(terms["logit_mse"], logit_mse_per_token(s, t))


# --- end to end ------------------------------------------------------------------------------------


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_combined_objective_run_logs_each_part_trains_projection_and_exports_clean_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from gkd.cli import main
    from gkd.objectives import PROJECTION_ATTR

    out = tmp_path / "run"
    objectives = "[0.7*jsd(beta=0.5), 0.2*hidden_mse, 0.1*attention_kl, 0.5*dkd]"
    assert main(["train", TINY, f"output_dir={out}", "progress_bar=false", "max_steps=6", f"objectives={objectives}",
                 "loss_temperature=2.0", "loss_temperature_end=1.0", "loss_temperature_schedule=linear",
                 "save_steps=6"]) == 0
    rows = _metrics(out)
    for key in ("loss_jsd(beta=0.5)", "loss_hidden_mse", "loss_attention_kl", "loss_dkd", "divergence"):
        assert all(math.isfinite(r[key]) for r in rows), key
    r = rows[0]
    weighted = 0.7 * r["loss_jsd(beta=0.5)"] + 0.2 * r["loss_hidden_mse"] + 0.1 * r["loss_attention_kl"] \
        + 0.5 * r["loss_dkd"]
    assert r["loss"] == pytest.approx(weighted, rel=1e-4)
    assert [r["loss_temperature"] for r in rows] == pytest.approx([2.0, 1.8, 1.6, 1.4, 1.2, 1.0])
    # the projection (student h96 → teacher h192) is trained and checkpointed with the student ...
    ckpt = out / "checkpoint-6"
    from safetensors.torch import load_file

    state = load_file(next(ckpt.glob("**/model.safetensors")))
    proj_keys = [k for k in state if PROJECTION_ATTR in k]
    assert sorted(proj_keys) == [f"{PROJECTION_ATTR}.maps.1.weight", f"{PROJECTION_ATTR}.maps.2.weight"]
    assert state[proj_keys[0]].shape == (192, 96)
    # ... and dropped from the exported model, which reloads without unexpected keys
    final = load_file(out / "final" / "model.safetensors")
    assert not [k for k in final if PROJECTION_ATTR in k]
    model, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]


def test_projection_learns_and_is_restored_on_resume(tmp_path):
    from gkd.cli import main

    args = [TINY, "progress_bar=false", "objectives=[jsd, hidden_mse]", "save_final_model=false", "lmbda=0"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", *args, f"output_dir={full}", "max_steps=4"]) == 0
    assert main(["train", *args, f"output_dir={part}", "max_steps=2", "save_steps=2"]) == 0
    assert main(["train", *args, f"output_dir={part}", "max_steps=4", "resume_from_checkpoint=latest"]) == 0
    a, b = _metrics(full), _metrics(part)[-2:]
    assert [x["loss_hidden_mse"] for x in a[2:]] == pytest.approx([x["loss_hidden_mse"] for x in b], rel=1e-5)
    assert a[-1]["loss_hidden_mse"] < a[0]["loss_hidden_mse"]


def test_attention_objective_with_different_head_counts_is_a_clear_error(tmp_path, tokenizer):
    from conftest import tiny_model

    from gkd.trainer import GKDTrainer

    student = tiny_model(tokenizer, "qwen2", hidden=32)
    teacher = tiny_model(tokenizer, "llama", hidden=48)
    teacher.config.num_attention_heads = 6
    cfg = GKDConfig(student="builtin:tiny-student", teacher="builtin:tiny-teacher", objectives=["attention_kl"],
                    output_dir=str(tmp_path), max_steps=1, progress_bar=False)
    with pytest.raises(InputError, match="student has 4 and the teacher 6"):
        GKDTrainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer)


def test_minillm_with_extra_objective_logs_it(tmp_path):
    from gkd.cli import main

    out = tmp_path / "mini"
    assert main(["train", str(ROOT / "recipes" / "minillm_tiny.yaml"), f"output_dir={out}", "progress_bar=false",
                 "max_steps=2", "save_final_model=false", "objectives=[0.5*logit_mse]"]) == 0
    rows = _metrics(out)
    assert all(math.isfinite(r["loss_logit_mse"]) for r in rows)
    assert all(r["loss"] == pytest.approx(r["pg"] + r["single_step"] + 0.5 * r["loss_logit_mse"], rel=1e-4,
                                          abs=1e-6) for r in rows)


def test_bad_objective_on_the_command_line_is_one_line_exit_2(tmp_path, capsys):
    from gkd.cli import main

    assert main(["train", TINY, f"output_dir={tmp_path}", "objectives=[0.5*hiden_mse]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'hidden_mse'" in err


def test_projection_init_is_independent_of_the_global_rng():
    torch.manual_seed(1)
    a = HiddenProjection([1, 2], 4, 6, seed=3)
    torch.manual_seed(2)
    b = HiddenProjection([1, 2], 4, 6, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.maps["1"].weight, a.maps["2"].weight)
