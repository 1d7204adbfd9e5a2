"""Typed configs that round-trip to YAML/JSON; the CLI builds its flags from their fields."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from taft.errors import TaftError

C = TypeVar("C")


class ConfigError(TaftError):
    pass


def load_config(cls: type[C], path: str | Path, **overrides: Any) -> C:
    """Read a YAML or JSON file into ``cls``; unknown keys are an error naming the valid ones."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of option: value")
    return from_dict(cls, {**data, **overrides})


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; valid options: {sorted(names)}")
    return cls(**data)


def coerce_value(cls: type, name: str, text: str) -> Any:
    """One option's value from text (``"1e-3"``, ``"true"``, ``"none"``), typed by the field's annotation."""
    import typing

    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if base is int:
            return int(text)
        if base is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected a {base.__name__}") from None
    return text


def save_config(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dataclasses.asdict(cfg)
    path.write_text(json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False))
    return path


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


METHODS = ("taft", "nlft", "fc", "lora", "adapter", "zero-shot")
LOSSES = ("rsl", "ce", "mse")
SCHEDULES = ("constant", "cosine", "step")
OPTIMIZERS = ("adam", "adamw", "sgd")
HEAD_INITS = ("random", "zero-shot", "zeros", "probe")


@dataclass
class TrainConfig:
    """One fine-tuning run. Defaults are TAFT on the last block of the embedded MiniLM."""

    model: str = field(default="minilm", metadata={"help": "model name (see `taft check --help`)"})
    data: str = field(default="sst2", metadata={
        "help": "task name (mr, sst2, sst5, subj, trec), folder or file; images: imagefolder:PATH | torchvision:NAME"})
    data_root: str | None = field(default=None, metadata={"help": "folder of the sentence-task files"})
    test_file: str | None = field(default=None, metadata={"help": "test file when --data is a single file"})
    num_classes: int | None = field(default=None, metadata={"help": "declared classes (labels outside are errors)"})
    method: str = field(default="taft", metadata={"help": "taft | nlft | fc | lora | adapter | zero-shot"})
    scope: str = field(default="last:1", metadata={"help": "parameters trained: last[:k] | all | attn | head | ..."})
    head_init: str = field(default="probe", metadata={
        "help": "random | zero-shot | zeros | probe (zero-shot, then a linear probe on frozen features)"})
    probe_epochs: int = field(default=10, metadata={"help": "head_init=probe: epochs of the linear probe"})
    probe_lr: float = field(default=1e-2, metadata={"help": "head_init=probe: learning rate of the linear probe"})
    reinit: bool = field(default=False, metadata={"help": "re-initialize the trained blocks first (PT=F)"})
    linearize_cls: bool = field(default=False, metadata={"help": "fresh linearized CLS token (CLS=T)"})
    loss: str = field(default="rsl", metadata={"help": "rsl (rescaled square) | ce | mse"})
    kappa: float = field(default=1.0, metadata={"help": "RSL weight on the true class"})
    rsl_m: float = field(default=15.0, metadata={"help": "RSL target scale M for the true class"})
    penalty: float = field(default=1e-4, metadata={"help": "λ in λ‖w − w0‖²"})
    radius: float | None = field(default=None, metadata={"help": "project Δw onto the ball ‖Δw‖ ≤ R"})
    optimizer: str = field(default="adam", metadata={"help": "adam | adamw | sgd"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    schedule: str = field(default="cosine", metadata={"help": "constant | cosine | step"})
    warmup: float = field(default=0.0, metadata={"help": "warm-up, as a fraction of all steps"})
    step_epochs: int = field(default=3, metadata={"help": "step schedule: decay every N epochs"})
    step_gamma: float = field(default=0.1, metadata={"help": "step schedule: decay factor"})
    epochs: int = field(default=5, metadata={"help": "passes over the training set"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    eval_batch_size: int = field(default=256, metadata={"help": "batch size of the prefix / evaluation passes"})
    max_length: int = field(default=128, metadata={"help": "tokens per sentence (longer are truncated)"})
    max_train: int | None = field(default=None, metadata={"help": "use only the first N training examples"})
    max_eval: int | None = field(default=None, metadata={"help": "use only the first N val/test examples"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    cache: str = field(default="memory", metadata={"help": "frozen-prefix feature cache: memory | disk | none"})
    cache_dir: str | None = field(default=None, metadata={"help": "folder for --cache disk (reused across runs)"})
    seed: int = field(default=0, metadata={"help": "seed of head init, shuffling, validation split"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    output_dir: str | None = field(default=None, metadata={"help": "where Δw, config and metrics are written"})

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("head_init", self.head_init, HEAD_INITS)
        _check_choice("cache", self.cache, ("memory", "disk", "none"))
        for name in ("epochs", "batch_size", "eval_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.penalty < 0 or not 0 <= self.warmup < 1:
            raise ConfigError("need lr > 0, penalty ≥ 0 and 0 ≤ warmup < 1")
        if self.radius is not None and self.radius <= 0:
            raise ConfigError(f"radius must be > 0, got {self.radius}")
        if self.cache == "disk" and not self.cache_dir:
            raise ConfigError("cache=disk needs cache_dir")
