"""Every error gkd raises on purpose, and the exit code the command line gives it.

This module imports nothing, so every other module can use it without import cycles.

- ``InputError`` (exit 2): something the user gave (recipe, data, model, reward function) is invalid;
  ``ConfigError`` is one about a recipe field or override.
- ``CheckpointError`` (exit 2): a checkpoint could not be written; earlier checkpoints are intact.
- ``NonFiniteError`` (exit 3): too many consecutive steps had NaN/inf values; checkpoints untouched.
- ``Preempted`` (exit 75, ``PREEMPTED_EXIT_CODE``): stopped on SIGTERM/SIGINT after a complete checkpoint.
- ``TeacherUnavailableError`` (exit 69, ``TEACHER_UNAVAILABLE_EXIT_CODE``): a served teacher did not answer
  within ``teacher_timeout``; the request may be fine, so it is not bad input (exit 2).
- ``TeacherChangedError`` (exit 76, ``TEACHER_CHANGED_EXIT_CODE``): after a reconnect the teacher server
  answered as another model or tokenizer; stopped so that no step is scored by the wrong teacher.
"""

__all__ = ["PREEMPTED_EXIT_CODE", "TEACHER_CHANGED_EXIT_CODE", "TEACHER_UNAVAILABLE_EXIT_CODE", "CheckpointError",
           "ConfigError", "InputError", "NonFiniteError", "Preempted", "TeacherChangedError",
           "TeacherUnavailableError"]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a complete checkpoint; resume to continue
TEACHER_UNAVAILABLE_EXIT_CODE = 69  # EX_UNAVAILABLE: the teacher server did not answer within teacher_timeout
TEACHER_CHANGED_EXIT_CODE = 76  # EX_PROTOCOL: the teacher server came back as another model / tokenizer


class InputError(ValueError):
    """Something the user gave (recipe, data, models, reward functions) is invalid.

    The command line prints the message as one line and exits with status 2; the message names the
    offending value and what to do about it."""


class ConfigError(InputError):
    """A recipe or override is invalid; the message says which value and how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); earlier checkpoints are intact."""


class TeacherUnavailableError(RuntimeError):
    """A served teacher did not answer within ``teacher_timeout`` seconds (refused, reset, 5xx); exit 69."""

    exit_code = TEACHER_UNAVAILABLE_EXIT_CODE


class TeacherChangedError(RuntimeError):
    """After a reconnect the teacher server published another model fingerprint or tokenizer hash; exit 76."""

    exit_code = TEACHER_CHANGED_EXIT_CODE


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after writing a complete checkpoint."""

    def __init__(self, signal_name: str, step: int, checkpoint: object):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(
            f"received {signal_name}: stopped after step {step} and saved {checkpoint}; "
            "resume with the same command plus resume_from_checkpoint=latest"
        )


_NON_FINITE_HINTS = {
    "teacher logits": "the teacher produced NaN/inf: check its weights and teacher_dtype (fp16 overflows; use bfloat16)",
    "student logits": "the student diverged: lower learning_rate, keep max_grad_norm > 0, prefer bf16 over fp16",
    "loss": "the divergence overflowed: lower loss_temperature extremes or learning_rate",
    "gradients": "gradients overflowed: lower learning_rate, enable max_grad_norm, prefer bf16 over fp16",
    "sampled log-probs": "a sampled token has a non-finite log-prob under the student or the sampling mixture "
                         "(with top_k / top_p: a token outside a model's truncated support); loosen top_k / top_p "
                         "or raise temperature, or lower learning_rate if the student diverged",
}


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had NaN/inf values; the run stopped, checkpoints untouched.

    ``last_checkpoint``: the newest complete checkpoint of the run (``None`` if none was saved)."""

    def __init__(self, step: int, cause: str, count: int, last_checkpoint: object | None):
        self.step, self.cause, self.count = step, cause, count
        last = (f"the last good checkpoint {last_checkpoint} is intact" if last_checkpoint is not None
                else "no checkpoint was saved yet")
        super().__init__(
            f"step {step}: {count} consecutive steps skipped for non-finite {cause}; {_NON_FINITE_HINTS[cause]}; {last}"
        )
