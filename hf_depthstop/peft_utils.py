# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""PEFT (LoRA and every method that wraps layers) on early-exit models: the exit heads train and save with the adapter.

The problem. PEFT freezes everything but the adapter and trains, in full, only the modules named in
`modules_to_save` (matched by `module_name.endswith(name)`). Its `SEQ_CLS` default is `["classifier", "score"]`,
which misses an exit head's other layers (`exit_heads.k.dense`), other task types add nothing, and a `ModuleList`
(`exit_heads`) is refused outright. Early-exit models then train LoRA on top of frozen, randomly initialised exit
heads, and the adapter file does not contain them.

The solution, one mechanism for every model class. PEFT 0.21 offers no model-side hook for `modules_to_save`
(there is no `_get_peft_modules_to_save`; `set_additional_trainable_modules` reads only the PEFT config). What every
PEFT entry point does (`get_peft_model` with any `task_type`, `PeftModel.from_pretrained`, `inject_adapter_in_model`;
transformers' `model.add_adapter` goes through `inject_adapter_in_model` too, but needs peft >= 0.22, so it is not
tested here) is build a tuner, whose last step assigns `model.peft_config = {adapter_name: config}`. [`DepthStopPeftMixin`] turns that assignment into the hook: it adds the
model's exit-head modules to each config's `modules_to_save` (so `save_pretrained` writes them and
`PeftModel.from_pretrained` restores them) and wraps them as PEFT's own `ModulesToSaveWrapper`s (so they train). A
model class adopts it with one line, `class DepthStop<Arch>For<Task>(DepthStopPeftMixin, <Arch>PreTrainedModel)`;
the modules it saves are its attributes named in `_exit_head_modules` (default `("exit_heads", "classifier")`;
absent attributes are skipped, so decoder LMs whose exits share the LM head add nothing).

Each module is wrapped at the finest level that owns parameters (`exit_heads.2.dense`, `exit_heads.2.classifier`,
`classifier`), which is exactly what PEFT's own suffix matching produces for `classifier` / `score`, so the two never
wrap one module twice. Modules that the adapter itself targets (e.g. `target_modules=["dense"]`) stay LoRA layers.

Adapters do not carry the base model's config, and the calibration and stopping rule live there. [`save_adapter`]
writes the config next to the adapter (`depthstop_config.json`: not `config.json`, which would make transformers
take the folder for a full model) and [`load_adapter`] restores the base model with it before loading the adapter.

```python
>>> from peft import LoraConfig, get_peft_model
>>> peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
>>> # ... train (DepthStopTrainer), calibrate(peft_model, validation) ...
>>> save_adapter(peft_model, "out/adapter")
>>> reloaded = load_adapter("out/adapter")  # PeftModel: same class, rule, calibration and outputs
>>> merged = reloaded.merge_and_unload()  # a plain DepthStop* model again
```
"""

import copy
import json
import os
from dataclasses import dataclass, field

from transformers.utils import logging


logger = logging.get_logger(__name__)

DEPTHSTOP_CONFIG_NAME = "depthstop_config.json"
DEFAULT_EXIT_HEAD_MODULES = ("exit_heads", "classifier")

# LoRA target modules that exist in each backbone (transformers v5 names), used when the caller gives none.
DEFAULT_LORA_TARGET_MODULES = {
    "depthstop_bert": ["query", "value"],
    "depthstop_vit": ["q_proj", "v_proj"],
    "depthstop_llama": ["q_proj", "v_proj"],
    "depthstop_gpt2": ["c_attn"],
}

_STORE = "_depthstop_peft_config"
# The Auto class that builds each task's model, by the suffix of the class name saved in `architectures`.
_AUTO_CLASS_BY_SUFFIX = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForImageClassification", "AutoModelForImageClassification"),
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
)  # instance __dict__ key of the `peft_config` property


class DepthStopPeftMixin:
    r"""
    Mixin for `DepthStop*` models: PEFT adapters (LoRA, ...) train and save the exit heads without anyone listing them.

    Put it first among the bases: `class DepthStopViTForImageClassification(DepthStopPeftMixin, ViTPreTrainedModel)`.
    The exit-head modules are the attributes named in `_exit_head_modules` (a class attribute; default
    `("exit_heads", "classifier")`, missing ones skipped). See the module docstring for how it hooks into PEFT.
    """

    _exit_head_modules: tuple[str, ...] = DEFAULT_EXIT_HEAD_MODULES

    @property
    def peft_config(self) -> dict:
        """The PEFT adapter configs by adapter name, as PEFT and transformers set them (absent before any adapter)."""
        try:
            return self.__dict__[_STORE]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no PEFT adapter (peft_config)") from None

    @peft_config.setter
    def peft_config(self, configs: dict) -> None:
        self.__dict__[_STORE] = configs
        if isinstance(configs, dict):
            attach_exit_heads(self, configs)

    @peft_config.deleter
    def peft_config(self) -> None:
        self.__dict__.pop(_STORE, None)


def _is_wrapped(module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return isinstance(module, (AuxiliaryTrainingWrapper, BaseTunerLayer))


def _units(module, prefix: str, out: list[str]) -> None:
    """Names of the topmost modules under `prefix` that own parameters (or are already PEFT wrappers)."""
    if _is_wrapped(module) or any(True for _ in module.parameters(recurse=False)):
        out.append(prefix)
        return
    for name, child in module.named_children():
        _units(child, f"{prefix}.{name}", out)


def exit_modules_to_save(model) -> list[str]:
    """
    The module names (paths from `model`'s root) that PEFT must train in full and save with an adapter: every layer
    with parameters of every exit head, the final one included, at the level PEFT's own `classifier` matching uses.

    Args:
        model: a `DepthStop*` model (the base model, not a `PeftModel`).

    Returns:
        `list[str]`, e.g. `["exit_heads.0.dense", "exit_heads.0.classifier", ..., "classifier"]`; empty for models whose
        exits have no modules of their own.
    """
    names = getattr(type(model), "_exit_head_modules", DEFAULT_EXIT_HEAD_MODULES)
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{type(model).__name__}._exit_head_modules must be a tuple of attribute names, got {names!r}")
    out: list[str] = []
    for attr in names:
        module = getattr(model, attr, None)
        if module is not None:
            _units(module, attr, out)
    return out


def _inside_wrapper(model, name: str) -> bool:
    """Whether `name` or one of its ancestors is already a PEFT wrapper (then it is already trained and saved)."""
    parts = name.split(".")
    module = model
    for part in parts:
        if _is_wrapped(module):
            return True
        module = getattr(module, part, None)
        if module is None:
            return False
    return False


def attach_exit_heads(model, configs: dict) -> list[str]:
    """
    Adds `model`'s exit-head modules to each adapter config's `modules_to_save` and wraps those not yet wrapped in
    PEFT's `ModulesToSaveWrapper` (trainable copy, saved with the adapter). Idempotent. Called by
    [`DepthStopPeftMixin`] whenever PEFT installs an adapter; prompt-learning configs (no `modules_to_save`) are left
    alone.

    Returns:
        `list[str]`: the module names it wrapped now.
    """
    from peft.utils.other import set_additional_trainable_modules

    wrapped: list[str] = []
    candidates = exit_modules_to_save(model)
    if not candidates:
        return wrapped
    active = getattr(model, "active_adapters", None)
    for adapter_name, config in configs.items():
        if not hasattr(config, "modules_to_save") or getattr(config, "is_prompt_learning", False):
            continue
        listed = list(config.modules_to_save or [])
        missing = []
        for name in candidates:
            target = model.get_submodule(name)
            if _is_wrapped(target) and not _is_modules_to_save(target):
                logger.info(f"{name} is adapted by the PEFT method itself (a tuner layer); not saved in full")
                continue
            if name in listed:
                continue
            if _inside_wrapper(model, name) and not _is_modules_to_save(target):
                continue
            missing.append(name)
        if not missing:
            continue
        config.modules_to_save = listed + missing
        to_wrap = [n for n in missing if not _is_wrapped(model.get_submodule(n))]
        if missing:  # PEFT's own routine: wraps new modules, adds this adapter to already wrapped ones
            narrowed = copy.copy(config)
            narrowed.modules_to_save = missing
            for field_name in ("modules_to_tie", "trainable_token_indices"):
                if hasattr(narrowed, field_name):
                    setattr(narrowed, field_name, None)
            is_active = adapter_name in active if isinstance(active, (list, tuple, set)) else True
            set_additional_trainable_modules(
                model=model,
                peft_config=narrowed,
                model_config={},
                adapter_name=adapter_name,
                activate_adapter=is_active,
            )
            wrapped.extend(to_wrap)
    if wrapped:
        logger.info(f"PEFT: exit heads trained and saved with the adapter: {', '.join(wrapped)}")
    return wrapped


def _is_modules_to_save(module) -> bool:
    from peft.utils.other import ModulesToSaveWrapper

    return isinstance(module, ModulesToSaveWrapper)


def add_exit_modules_to_save(peft_config, model):
    """
    Explicit form of what [`DepthStopPeftMixin`] does automatically: returns `peft_config` with `model`'s exit-head
    modules appended to `modules_to_save` (for models without the mixin, or to see the list before wrapping).

    Raises:
        `TypeError`: if `peft_config` is a prompt-learning config or has no `modules_to_save` field.
    """
    if not hasattr(peft_config, "modules_to_save") or getattr(peft_config, "is_prompt_learning", False):
        raise TypeError(
            f"peft_config of type {type(peft_config).__name__} is a prompt-learning method or has no "
            "modules_to_save field: it cannot train exit heads"
        )
    listed = list(peft_config.modules_to_save or [])
    peft_config.modules_to_save = listed + [n for n in exit_modules_to_save(model) if n not in listed]
    return peft_config


def lora_config(
    model,
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    target_modules: list[str] | str | None = None,
    task_type: str | None = None,
):
    """
    A `peft.LoraConfig` for a `DepthStop*` model, with its exit heads in `modules_to_save`.

    Args:
        model: the base model (its `config.model_type` picks default `target_modules`).
        r (`int`), lora_alpha (`int`), lora_dropout (`float` in [0, 1)): the LoRA rank, scale and dropout.
        target_modules (`list[str]` or comma-separated `str`, *optional*): module name suffixes to adapt; default
            per architecture (`DEFAULT_LORA_TARGET_MODULES`).
        task_type (`str`, *optional*): PEFT task type (`"SEQ_CLS"`, `"CAUSAL_LM"`, or `None`).
    """
    from peft import LoraConfig

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r must be a positive integer, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_LORA_TARGET_MODULES:
            raise ValueError(
                f"no default lora_target_modules for model_type={model_type!r}; pass lora_target_modules explicitly"
            )
        target_modules = list(DEFAULT_LORA_TARGET_MODULES[model_type])
    if not target_modules:
        raise ValueError(f"lora_target_modules must name at least one module, got {target_modules!r}")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [
        t for t in target_modules if t not in names and not any(n.endswith(t) for n, _ in model.named_modules())
    ]
    if unknown:
        raise ValueError(f"lora_target_modules {unknown} match no module of {type(model).__name__}")
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=float(lora_dropout),
        target_modules=list(target_modules),
        task_type=task_type,
    )
    return add_exit_modules_to_save(config, model)


@dataclass
class PeftArguments:
    """Recipe flags for PEFT: add this dataclass to a recipe's `HfArgumentParser` and call [`apply_peft`]."""

    use_peft: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter (+ the exit heads) instead of all weights."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scale alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module-name suffixes to adapt (default per architecture, BERT: query,value)."
        },
    )


def apply_peft(model, args: PeftArguments):
    """`model` unchanged when `args.use_peft` is false, else `peft.get_peft_model(model, lora_config(...))`."""
    if not args.use_peft:
        return model
    from peft import get_peft_model

    config = lora_config(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    return get_peft_model(model, config)


def _base_of(peft_model):
    get_base = getattr(peft_model, "get_base_model", None)
    if get_base is None:
        raise TypeError(f"expected a peft.PeftModel, got {type(peft_model).__name__}")
    return get_base()


def save_adapter(peft_model, save_directory: str, **kwargs) -> None:
    """
    `peft_model.save_pretrained(save_directory)` (adapter weights, exit heads included) plus the base model's config
    (exit layers, stopping rule, calibration) as `depthstop_config.json`, so [`load_adapter`] restores all of it.
    Extra keyword arguments go to `PeftModel.save_pretrained` (e.g. `is_main_process`).
    """
    base = _base_of(peft_model)
    if kwargs.get("is_main_process", True) is False:
        return
    peft_model.save_pretrained(save_directory, **kwargs)
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.to_json_file(os.path.join(save_directory, DEPTHSTOP_CONFIG_NAME), use_diff=False)


def load_adapter(adapter_dir: str, base_model_name_or_path: str | None = None, is_trainable: bool = False, **kwargs):
    """
    Loads an adapter saved by [`save_adapter`]: the base model (from `base_model_name_or_path`, default the adapter's
    own `base_model_name_or_path`) with the saved `depthstop_config.json`, then the adapter on top.

    Returns:
        `peft.PeftModel` around the `DepthStop*` model; `merge_and_unload()` gives the plain model.

    Raises:
        `FileNotFoundError`: if `adapter_dir` lacks `adapter_config.json` or `depthstop_config.json`.
        `ValueError`: if no base model path is given or recorded.
    """
    import transformers
    from peft import PeftConfig, PeftModel
    from transformers import CONFIG_MAPPING

    for name in ("adapter_config.json", DEPTHSTOP_CONFIG_NAME):
        if not os.path.isfile(os.path.join(adapter_dir, name)):
            raise FileNotFoundError(f"{name} not found in adapter_dir={adapter_dir!r} (save it with save_adapter)")
    config_file = os.path.join(adapter_dir, DEPTHSTOP_CONFIG_NAME)
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{config_file} has model_type={model_type!r}, which is not registered (import hf_depthstop)")
    config = CONFIG_MAPPING[model_type].from_json_file(config_file)
    base_path = base_model_name_or_path or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    if not base_path:
        raise ValueError(
            f"the adapter in {adapter_dir!r} records no base_model_name_or_path; pass base_model_name_or_path"
        )
    architecture = (config.architectures or [""])[0]
    auto_name = next((auto for suffix, auto in _AUTO_CLASS_BY_SUFFIX if architecture.endswith(suffix)), None)
    if auto_name is None:
        raise ValueError(f"{DEPTHSTOP_CONFIG_NAME} in {adapter_dir!r} names no known model class: {architecture!r}")
    base = getattr(transformers, auto_name).from_pretrained(base_path, config=config, **kwargs)
    if type(base).__name__ != architecture:
        raise ValueError(f"{auto_name} built {type(base).__name__}, not {architecture} (import hf_depthstop first)")
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)


__all__ = [
    "DEFAULT_LORA_TARGET_MODULES",
    "DEPTHSTOP_CONFIG_NAME",
    "DepthStopPeftMixin",
    "PeftArguments",
    "add_exit_modules_to_save",
    "apply_peft",
    "attach_exit_heads",
    "exit_modules_to_save",
    "load_adapter",
    "lora_config",
    "save_adapter",
]
