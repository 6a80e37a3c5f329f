"""The algorithms package: registry, pure advantage functions (against brute-force loops and a
two-rank simulation), and the layout rules (no import cycles, no file outside the repository cited,
sizes)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from gkd.algorithms import ALGORITHMS, get_algorithm
from gkd.algorithms.gkd import batch_baseline_advantages, group_baseline_advantages
from gkd.algorithms.minillm import MiniLLMBuffer, minillm_advantages
from gkd.config import ALGORITHM_NAMES, ConfigError, GKDConfig
from gkd.rollout import Rollout

PKG = Path(__file__).resolve().parents[1] / "gkd"


# --- registry -----------------------------------------------------------------------------------


def test_registry_names_are_the_configs_algorithm_choices():
    assert set(ALGORITHMS) == set(ALGORITHM_NAMES)
    for name, cls in ALGORITHMS.items():
        assert cls.name == name and get_algorithm(name) is cls
        GKDConfig(algorithm=name, student="s", teacher="t")  # accepted by the config
    with pytest.raises(ConfigError, match="gkd, minillm"):
        get_algorithm("ppo")
    with pytest.raises(ConfigError, match="algorithm"):
        GKDConfig(algorithm="ppo", student="s", teacher="t")


# --- pure advantage functions ----------------------------------------------------------------------


def two_ranks(run_a, run_b):
    """Run a function that all-reduces (sums) tensors as two simulated ranks: each call's result is
    the sum of both ranks' inputs of that call. ``run_x(all_reduce_sum)`` returns the rank's output."""
    inputs: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    def recorder(name):
        def reduce(t):
            inputs[name].append(t.clone())
            return t
        return reduce

    run_a(recorder("a"))
    run_b(recorder("b"))
    assert len(inputs["a"]) == len(inputs["b"]) > 0

    def summed(name):
        calls = iter(range(len(inputs[name])))

        def reduce(t):
            k = next(calls)
            torch.testing.assert_close(t, inputs[name][k])  # the same inputs as in the first pass
            return inputs["a"][k] + inputs["b"][k]
        return reduce

    return run_a(summed("a")), run_b(summed("b"))


def test_group_baseline_is_each_prompts_mean_by_brute_force():
    g = torch.Generator().manual_seed(0)
    rewards, mask = torch.randn(12, generator=g), torch.rand(12, generator=g) > 0.3
    got = group_baseline_advantages(rewards, mask, 3)
    for i in range(12):
        group = range(i // 3 * 3, i // 3 * 3 + 3)
        rewarded = [float(rewards[j]) for j in group if mask[j]]
        want = rewards[i] - sum(rewarded) / max(len(rewarded), 1) if mask[i] else 0.0
        assert float(got[i]) == pytest.approx(float(want), abs=1e-6)


def test_batch_baseline_over_two_ranks_equals_one_process():
    g = torch.Generator().manual_seed(1)
    rewards = [torch.randn(4, generator=g) for _ in range(4)]
    masks = [torch.rand(4, generator=g) > 0.25 for _ in range(4)]
    whole = batch_baseline_advantages(rewards, masks)
    flat = torch.cat(rewards)[torch.cat(masks)]
    for r, m, a in zip(rewards, masks, whole, strict=True):  # brute force: minus the mean rewarded value
        torch.testing.assert_close(a, torch.where(m, r - flat.mean(), 0.0))
    a, b = two_ranks(lambda red: batch_baseline_advantages(rewards[:2], masks[:2], red),
                     lambda red: batch_baseline_advantages(rewards[2:], masks[2:], red))
    for got, want in zip(a + b, whole, strict=True):
        torch.testing.assert_close(got, want)


def _rollout(g: torch.Generator, lengths: list[int], with_rewards: bool) -> Rollout:
    width = max(lengths) + 1
    mask = torch.tensor([[t < n for t in range(width)] for n in lengths])
    b = len(lengths)
    return Rollout(prompt_ids=torch.ones(b, 1, dtype=torch.long), prompt_mask=torch.ones(b, 1, dtype=torch.bool),
                   completion_ids=torch.ones(b, width, dtype=torch.long), completion_mask=mask,
                   sampled_logprobs=-torch.rand(b, width, generator=g), teacher_logprobs=-2 * torch.rand(b, width, generator=g),
                   mixed_logprobs=torch.zeros(b, width),
                   rewards=torch.randn(b, generator=g) if with_rewards else None,
                   reward_mask=torch.rand(b, generator=g) > 0.3 if with_rewards else None)


def _brute_force_advantages(rollouts, alpha, scale, gamma, include_current, length_normalized, whiten_advantages,
                            clip=0.0):
    """Per-sequence loops in float64: rewards, user reward at the last token, returns, global whitening."""
    out = []
    for r in rollouts:
        rows = []
        for i in range(r.completion_ids.shape[0]):
            n = int(r.completion_mask[i].sum())
            tok = [scale * (float(r.teacher_logprobs[i, t]) - float(r.sampled_logprobs[i, t])) for t in range(n)]
            tok = [alpha * (max(-clip, min(clip, v)) if clip else v) for v in tok]
            if r.rewards is not None and alpha < 1.0 and n and r.reward_mask[i]:
                tok[n - 1] += (1 - alpha) * float(r.rewards[i])
            ret = []
            for t in range(n):
                first = t if include_current else t + 1
                terms = [gamma ** (u - first) * tok[u] for u in range(first, n)]
                value = sum(terms)
                ret.append(value / max(len(terms), 1) if length_normalized else value)
            rows.append(ret)
        out.append(rows)
    if whiten_advantages:
        flat = torch.tensor([v for rows in out for ret in rows for v in ret], dtype=torch.float64)
        mean, std = flat.mean(), flat.var(unbiased=False).sqrt()
        out = [[[(v - float(mean)) / float(std) for v in ret] for ret in rows] for rows in out]
    return out


@pytest.mark.parametrize("gamma,include_current,length_normalized,whiten_advantages,alpha,clip", [
    (1.0, False, True, False, 1.0, 0.0),   # the paper's form
    (0.95, True, True, True, 1.0, 0.0),    # the authors' code
    (0.95, True, True, True, 1.0, 0.2),    # ... with reward clipping (scaled rewards here reach ~1)
    (0.9, False, False, True, 0.5, 0.0),   # plain discounted return, user reward at the final token
])
def test_minillm_advantages_equal_a_brute_force_loop(gamma, include_current, length_normalized, whiten_advantages,
                                                     alpha, clip):
    g = torch.Generator().manual_seed(2)
    rollouts = [_rollout(g, [3, 5, 1], True), _rollout(g, [4, 2, 6], True)]
    kw = dict(alpha=alpha, reward_scale=0.5, gamma=gamma, include_current=include_current,
              length_normalized=length_normalized, whiten_advantages=whiten_advantages, reward_clip=clip)
    got, token_reward_mean = minillm_advantages(rollouts, **kw)
    want = _brute_force_advantages(rollouts, alpha, 0.5, gamma, include_current, length_normalized, whiten_advantages,
                                   clip)
    for adv, rows in zip(got, want, strict=True):
        for i, ret in enumerate(rows):
            assert adv[i, : len(ret)].tolist() == pytest.approx(ret, rel=1e-4, abs=1e-5)
            assert not adv[i, len(ret):].any()  # padding stays 0
    rewards = [0.5 * (float(r.teacher_logprobs[i, t]) - float(r.sampled_logprobs[i, t]))
               for r in rollouts for i in range(3) for t in range(int(r.completion_mask[i].sum()))]
    rewards = [max(-clip, min(clip, v)) if clip else v for v in rewards]
    assert token_reward_mean == pytest.approx(sum(rewards) / len(rewards), rel=1e-5)


def test_minillm_whitening_over_two_ranks_equals_one_process():
    g = torch.Generator().manual_seed(3)
    rollouts = [_rollout(g, [3, 5], False), _rollout(g, [1, 6], False), _rollout(g, [4, 4], False)]
    kw = dict(alpha=1.0, reward_scale=1.0, gamma=0.95, include_current=True, length_normalized=True,
              whiten_advantages=True)
    whole, mean = minillm_advantages(rollouts, **kw)
    (a, mean_a), (b, mean_b) = two_ranks(lambda red: minillm_advantages(rollouts[:1], all_reduce_sum=red, **kw),
                                         lambda red: minillm_advantages(rollouts[1:], all_reduce_sum=red, **kw))
    for got, want in zip(a + b, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert mean_a == mean_b == pytest.approx(mean, rel=1e-6)


def test_minillm_buffer_keeps_its_checkpoint_form():
    g = torch.Generator().manual_seed(4)
    buffer = MiniLLMBuffer([_rollout(g, [2, 3], True)], {"token_reward_mean": -0.5}, epoch=1, order=[0], next=1)
    state = buffer.to_dict()
    assert set(state) == {"buffer", "shared", "epoch", "order", "next"}  # the first checkpoints' layout
    back = MiniLLMBuffer.from_dict(state)
    assert (back.epoch, back.order, back.next, back.shared) == (1, [0], 1, {"token_reward_mean": -0.5})
    torch.testing.assert_close(back.rollouts[0].teacher_logprobs, buffer.rollouts[0].teacher_logprobs)


# --- layout rules -------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """gkd modules that ``path`` imports anywhere (functions included), except under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {name: _imports(path, set(files)) - {name, "gkd"} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "gkd.algorithms.minillm" in graph and "gkd.errors" in graph["gkd.trainer"]
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph) or [])
    assert find_cycle({**graph, "gkd.errors": {"gkd.trainer"}}) is not None  # the walker does see cycles


def test_errors_imports_nothing():
    tree = ast.parse((PKG / "errors.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


def test_no_reference_to_files_outside_the_repository():
    offenders = [f"{p.relative_to(PKG.parent)}:{i}" for p in PKG.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"DESIGN(\.md)? ?§", line)]
    assert not offenders


def test_sizes_keep_the_layout_readable():
    sizes = {p.relative_to(PKG.parent): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert max(sizes.values()) <= 600, max(sizes.items(), key=lambda kv: kv[1])
    tree = ast.parse((PKG / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GKDTrainer")
    assert trainer.end_lineno - trainer.lineno + 1 <= 300  # type: ignore[operator]


def test_public_names_of_the_old_trainer_module_still_import():
    import gkd
    import gkd.trainer

    before_the_split = ["PREEMPTED_EXIT_CODE", "GKDTrainer", "NonFiniteError", "Preempted", "build_accelerator",
                        "disable_dropout", "load_model", "load_tokenizer"]
    assert set(before_the_split) <= set(gkd.trainer.__all__)
    assert all(hasattr(gkd.trainer, name) for name in gkd.trainer.__all__)
    assert gkd.GKDTrainer is gkd.trainer.GKDTrainer and gkd.GKDConfig is GKDConfig


def test_lmbda_schedule_by_hand():
    from gkd.algorithms.gkd import lmbda_at

    assert [lmbda_at(s, 10, 0.5) for s in range(10)] == [0.5] * 10
    assert [lmbda_at(s, 6, 1.0, warmup_steps=2) for s in range(6)] == [0, 0, 1, 1, 1, 1]
    linear = [lmbda_at(s, 7, 0.0, 1.0, "linear", warmup_steps=2) for s in range(7)]
    assert linear == pytest.approx([0, 0, 0, 0.25, 0.5, 0.75, 1.0])
    cosine = [lmbda_at(s, 5, 0.2, 1.0, "cosine") for s in range(5)]
    assert cosine[0] == pytest.approx(0.2) and cosine[-1] == pytest.approx(1.0) and cosine == sorted(cosine)


def test_lmbda_schedule_through_the_trainer(tmp_path):
    from gkd.cli import main

    tiny = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
    out = tmp_path / "warm"
    assert main(["train", tiny, f"output_dir={out}", "lmbda=1", "off_policy_warmup_steps=3", "max_steps=6",
                 "progress_bar=false", "save_final_model=false"]) == 0
    rows = [__import__("json").loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in rows] == [0, 0, 0, 1, 1, 1] and [r["lmbda"] for r in rows] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ConfigError, match="needs lmbda_end"):
        GKDConfig(student="s", teacher="t", lmbda_schedule="linear")
    with pytest.raises(ConfigError, match="apply to algorithm=gkd"):
        GKDConfig(student="s", teacher="t", algorithm="minillm", off_policy_warmup_steps=2)


def test_final_token_advantage_of_the_paper_form_is_the_same_for_every_sequence():
    """Why the lmops preset includes r_t: in the paper's form the return after the last token is empty
    (0), so after whitening every sequence's last token gets the same advantage −μ/σ, whatever its
    quality. Including r_t in the return makes the last token's advantage its own reward."""
    g = torch.Generator().manual_seed(5)
    rollouts = [_rollout(g, [3, 5, 4, 6], False)]
    kw = dict(alpha=1.0, reward_scale=1.0, gamma=1.0, length_normalized=True, whiten_advantages=True)
    last = rollouts[0].last_token_index
    (paper,), _ = minillm_advantages(rollouts, include_current=False, **kw)
    finals = paper.gather(1, last[:, None]).squeeze(1)
    assert torch.allclose(finals, finals[0].expand_as(finals))
    (lmops,), _ = minillm_advantages(rollouts, include_current=True, **kw)
    assert lmops.gather(1, last[:, None]).squeeze(1).unique().numel() == 4


def test_minillm_presets_fill_the_fields_left_at_their_defaults():
    from gkd.config import MINILLM_PRESETS

    lmops = GKDConfig(algorithm="minillm", student="s", teacher="t", minillm_preset="lmops", gamma=0.9)
    assert lmops.gamma == 0.9  # set explicitly: wins
    for name in ("include_current_reward", "reward_scale", "reward_clip", "learning_rate", "adam_beta2", "weight_decay",
                 "single_step_weighted", "lm_kd_weight"):
        assert getattr(lmops, name) == MINILLM_PRESETS["lmops"][name], name
    assert lmops.lm_coef == 0.0  # no lm_dataset: no LM loss
    assert GKDConfig(algorithm="minillm", student="s", teacher="t", minillm_preset="lmops", lm_dataset="x.jsonl").lm_coef == 1
    paper = GKDConfig(algorithm="minillm", student="s", teacher="t", minillm_preset="paper")
    assert paper.single_step_weighted and paper.gamma == 1.0 and not paper.include_current_reward
    with pytest.raises(ConfigError, match="applies to algorithm=minillm"):
        GKDConfig(student="s", teacher="t", minillm_preset="lmops")
    with pytest.raises(ConfigError, match="minillm_preset='ppo' is not valid"):
        GKDConfig(algorithm="minillm", student="s", teacher="t", minillm_preset="ppo")


def test_lm_loss_with_kd_weight_equals_ce_plus_kl_by_hand(tokenizer, tmp_path):
    """lm_kd_weight = w: per token (1−w)·CE + w·KL(teacher‖student), against float64 unpadded forwards."""
    import copy

    from conftest import tiny_model

    from gkd.data import reference_rollout
    from gkd.trainer import GKDTrainer

    student, teacher = tiny_model(tokenizer, seed=1), tiny_model(tokenizer, hidden=64, seed=2)
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    lm = [{"text": "<bos>12+34=6400"}, {"text": "<bos>5+6=11"}]
    cfg = GKDConfig(algorithm="minillm", teacher="t", student="s", num_train_examples=64, max_new_tokens=12,
                    num_rollouts=2, per_device_batch_size=2, max_steps=1, lm_coef=1.0, lm_kd_weight=0.5,
                    lm_dataset="given", output_dir=str(tmp_path / "run"), progress_bar=False)
    trainer = GKDTrainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer, lm_rows=lm)
    batch = next(trainer.parts.lm_batches)
    rollout = reference_rollout(batch)
    with torch.no_grad():
        got = trainer.algorithm.lm_loss(rollout)
    bos = tokenizer.bos_token_id
    for i, row in enumerate(batch["rows"]):
        ids = tokenizer(row["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        seq = torch.tensor([[bos, *ids]])
        with torch.no_grad():
            ls = torch.log_softmax(s64(seq).logits[0, :-1], -1)
            lt = torch.log_softmax(t64(seq).logits[0, :-1], -1)
        ce = -ls.gather(-1, torch.tensor(ids)[:, None])[:, 0]
        kl = (lt.exp() * (lt - ls)).sum(-1)
        torch.testing.assert_close(got[i, : len(ids)].double(), 0.5 * ce + 0.5 * kl, rtol=1e-4, atol=1e-5)
