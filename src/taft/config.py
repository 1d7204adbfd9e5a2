"""Typed configs that round-trip to YAML/JSON; the CLI builds its flags from their fields."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from taft.errors import TaftError

C = TypeVar("C")


class ConfigError(TaftError):
    pass


def load_config(cls: type[C], path: str | Path, **overrides: Any) -> C:
    """Read a YAML or JSON file into ``cls``; unknown keys are an error naming the valid ones.

    Values are checked against the field types (see :func:`coerce_fields`); every problem is a
    :class:`ConfigError` naming the file."""
    data = read_config_file(path)
    return from_dict(cls, {**data, **overrides})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping stored in a YAML or JSON file (``.json`` is parsed as JSON, anything else as YAML)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a .yaml or .json file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from e
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from e
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path}: invalid YAML{where}: {problem}") from e
    if data is None:
        raise ConfigError(f"config file {path} is empty; write one `option: value` per line")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of option: value, got a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config file {path}: option names must be strings, got {bad}")
    return data


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; valid options: {sorted(names)}")
    return cls(**data)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as the type ``annotation`` (``int``, ``float``, ``bool``, ``str``, optionally ``| None``).

    Conversions are the lossless ones a YAML file needs: PyYAML reads ``1e-3`` as a string, so numeric
    strings become numbers; an integral float (``2.0``) becomes an int. Booleans are never numbers."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} needs a value (got null)")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ConfigError(f"{name} must be true or false, got {_describe(value)}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            return int(value)
        raise ConfigError(f"{name} must be an integer, got {_describe(value)}")
    if base is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None:
            raise ConfigError(f"{name} must be a number, got {_describe(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {_describe(value)}; quote it in YAML")
    return value


def coerce_fields(obj: Any) -> None:
    """Check (and losslessly convert, in place) every field of the dataclass ``obj`` against its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        setattr(obj, f.name, _coerce(f.name, getattr(obj, f.name), hints[f.name]))


def coerce_value(cls: type, name: str, text: str) -> Any:
    """One option's value from command-line text (``"1e-3"``, ``"true"``, ``"none"``), typed by the field."""
    value = None if text.strip().lower() in ("none", "null") else text
    return _coerce(name, value, typing.get_type_hints(cls)[name])


def save_config(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dataclasses.asdict(cfg)
    path.write_text(json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False))
    return path


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


def check_scope_syntax(spec: str) -> None:
    """Refuse scope strings that cannot be parsed (``last:abc``, a bad regex) before any model is built."""
    if not spec.strip():
        raise ConfigError("scope is empty; use last[:k], all, attn, attn+bias, bias, norm, head or a pattern")
    for raw in (s.strip() for s in spec.split(",")):
        item = raw.removeprefix("!")
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as e:
                raise ConfigError(f"scope {spec!r}: {item!r} is not a valid regular expression ({e})") from e
        elif item.split(":")[0] == "last" and not re.fullmatch(r"last(:[1-9][0-9]*)?", item):
            raise ConfigError(f"scope {spec!r}: {item!r} is not valid; write last or last:K with K a whole number ≥ 1")


CLASS_NAMES_FIX = '--class-names "name0,name1,..." (or @PATH: a text file, one name per line)'


def resolve_class_names(value: str) -> str:
    """``TrainConfig.class_names`` in its stored form: the names, stripped and comma-joined.

    ``value`` is ``"name0,name1,..."`` or ``@PATH``, a UTF-8 text file with one name per line (blank lines
    ignored), read here once: the config then holds the names themselves, so a run or shard store does not depend
    on the file later. Names may not be empty, repeat or contain a comma, the first may not start with ``@``;
    two at least."""
    text = value.strip()
    if text.startswith("@"):
        path = Path(text[1:].strip()).expanduser()
        if not text[1:].strip():
            raise ConfigError(f"class_names {value!r}: '@' names no file; write {CLASS_NAMES_FIX}")
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise ConfigError(f"class_names: file {path} {what}; write {CLASS_NAMES_FIX}")
        try:
            lines = path.read_bytes().decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(f"class_names: file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
        except OSError as e:
            raise ConfigError(f"class_names: file {path} cannot be read: {e.strerror}") from e
        names, source = [line.strip() for line in lines if line.strip()], f"file {path}"
        with_comma = [n for n in names if "," in n]
        if with_comma:
            raise ConfigError(f"class_names: {source}: names cannot contain a comma ({with_comma[0]!r}); the config "
                              f"stores them comma-separated")
    else:
        names, source = [n.strip() for n in text.split(",")], repr(value)
        empty = [i for i, n in enumerate(names) if not n]
        if empty:
            raise ConfigError(f"class_names {source}: name {empty[0]} (counting from 0) is empty; write "
                              f"{CLASS_NAMES_FIX}, one non-empty name per class")
    if len(names) < 2:
        raise ConfigError(f"class_names {source}: {len(names)} name(s); a classifier needs two classes at least: "
                          f"write {CLASS_NAMES_FIX}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"class_names {source}: {repeated} appear(s) more than once; give every class its own "
                          f"name with --class-names")
    if names[0].startswith("@"):  # the stored "@a,b" would read as a file
        raise ConfigError(f"class_names {source}: the first name {names[0]!r} starts with '@', which marks a file; "
                          f"rename it")
    return ",".join(names)


def class_name_list(value: str | None) -> list[str] | None:
    """The names of a resolved ``TrainConfig.class_names`` (see :func:`resolve_class_names`), or None."""
    return None if value is None else value.split(",")


DEVICE = re.compile(r"cpu|mps|cuda(:(0|[1-9][0-9]{0,8}))?")
DEVICE_HELP = "use cpu, cuda, cuda:N (N = 0, 1, ...) or mps"


def parse_device(name: str):
    """``name`` as a ``torch.device``, or a :class:`ConfigError` naming the valid spellings. Only the devices taft
    runs on are accepted (not ``gpu``, ``cuda:007`` or an index torch cannot parse); whether the machine has one is
    checked where the device is first used (:func:`taft.train.loop.resolve_device`)."""
    if not isinstance(name, str) or not DEVICE.fullmatch(name):
        raise ConfigError(f"device={name!r} is not valid; {DEVICE_HELP}")
    import torch

    try:
        return torch.device(name)
    except RuntimeError as e:  # what torch's own parser refuses
        raise ConfigError(f"device={name!r} is not valid ({e}); {DEVICE_HELP}") from e


# ε above this is no privacy in any useful sense (e^100 ≈ 2.7e43 is the allowed likelihood ratio), and the noise
# calibration for it searches noise multipliers close to 0, where the accountants are slow and imprecise.
MAX_DP_EPSILON = 100.0


def check_dp_epsilon(epsilon: float) -> None:
    """Refuse a DP target ε that is not a finite number in (0, MAX_DP_EPSILON]."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise ConfigError(f"dp_epsilon must be a number, got {epsilon!r}; typical targets are 1, 3 or 8")
    if not math.isfinite(epsilon):
        raise ConfigError(f"dp_epsilon must be a finite number, got {epsilon}; typical targets are 1, 3 or 8, and "
                          "leaving --dp-epsilon out trains without privacy")
    if epsilon <= 0:
        raise ConfigError(f"dp_epsilon must be > 0, got {epsilon}; typical targets are 1, 3 or 8")
    if epsilon > MAX_DP_EPSILON:
        raise ConfigError(f"dp_epsilon={epsilon:g} is above {MAX_DP_EPSILON:g}: such an ε gives no meaningful privacy "
                          f"guarantee; use a target such as 1, 3 or 8, or omit --dp-epsilon for non-private training")


METHODS = ("taft", "nlft", "fc", "lora", "adapter", "zero-shot")
LOSSES = ("rsl", "ce", "mse")
SCHEDULES = ("constant", "cosine", "step")
OPTIMIZERS = ("adam", "adamw", "sgd")
HEAD_INITS = ("random", "zero-shot", "zeros", "probe")
DTYPES = ("float32", "bfloat16", "float16")


# Per-method defaults of options left unset, chosen on validation splits (see README, "Numbers chosen honestly"):
# the linear probe (fc, and head_init=probe) needs more, larger steps than fine-tuning a block. TAFT and NLFT: the
# same lr grid on the five visible tasks' validation splits, the best mean (benchmarks/single_defaults.py).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "fc": {"lr": 1e-2, "epochs": 30},
    "zero-shot": {"lr": 1e-2, "epochs": 30},
    "taft": {"lr": 3e-4, "epochs": 5},
    "*": {"lr": 1e-3, "epochs": 5},
}


@dataclass
class TrainConfig:
    """One fine-tuning run. Defaults are TAFT on the last block of the embedded MiniLM."""

    model: str = field(default="minilm", metadata={"help": "model name (see `taft check --help`)"})
    data: str = field(default="sst2", metadata={
        "help": "task name (mr, sst2, sst5, subj, trec), folder or file; images: imagefolder:PATH | torchvision:NAME"})
    data_root: str | None = field(default=None, metadata={"help": "folder of the sentence-task files"})
    test_file: str | None = field(default=None, metadata={"help": "test file when --data is a single file"})
    num_classes: int | None = field(default=None, metadata={"help": "declared classes (labels outside are errors)"})
    class_names: str | None = field(default=None, metadata={
        "help": "class names in label order, for the zero-shot head: \"name0,name1,...\" or @PATH (a text file, "
                "one name per line; read once, the config keeps the names)"})
    method: str = field(default="taft", metadata={"help": "taft | nlft | fc | lora | adapter | zero-shot"})
    scope: str = field(default="last:1", metadata={
        "help": "parameters trained: last[:k] | all | attn | attn+bias | bias | norm | head | ..."})
    head_init: str = field(default="probe", metadata={
        "help": "random | zero-shot | zeros | probe (zero-shot, then a linear probe on frozen features)"})
    probe_epochs: int = field(default=30, metadata={"help": "head_init=probe: epochs of the linear probe"})
    probe_lr: float = field(default=1e-2, metadata={"help": "head_init=probe: learning rate of the linear probe"})
    reinit: bool = field(default=False, metadata={"help": "re-initialize the trained blocks first (PT=F)"})
    linearize_cls: bool = field(default=False, metadata={"help": "fresh linearized CLS token (CLS=T)"})
    prediction: str = field(default="full", metadata={
        "help": "method taft: full (f(x; w0) + J·Δw) | linear-part (J·Δw alone, the paper's private-run output)"})
    loss: str = field(default="rsl", metadata={"help": "rsl (rescaled square) | ce | mse"})
    kappa: float = field(default=1.0, metadata={"help": "RSL weight on the true class"})
    rsl_m: float = field(default=15.0, metadata={"help": "RSL target scale M for the true class"})
    penalty: float = field(default=1e-4, metadata={"help": "λ in λ‖w − w0‖²"})
    radius: float | None = field(default=None, metadata={"help": "project Δw onto the ball ‖Δw‖ ≤ R"})
    optimizer: str = field(default="adam", metadata={"help": "adam | adamw | sgd"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (default by method: taft 3e-4, fc 1e-2, the others 1e-3)"})
    schedule: str = field(default="cosine", metadata={"help": "constant | cosine | step"})
    warmup: float = field(default=0.0, metadata={"help": "warm-up, as a fraction of all steps"})
    step_epochs: int = field(default=3, metadata={"help": "step schedule: decay every N epochs"})
    step_gamma: float = field(default=0.1, metadata={"help": "step schedule: decay factor"})
    epochs: int | None = field(default=None, metadata={
        "help": "passes over the training set (default by method: fc 30, the others 5)"})
    min_steps: int | None = field(default=None, metadata={
        "help": "train at least this many optimizer steps: epochs are raised on small training sets (the shards "
                "of a store) so their training does not shrink with their size"})
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
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | cuda:N | mps"})
    dtype: str = field(default="float32", metadata={
        "help": "the model's precision: float32 | bfloat16 | float16 (Δw stays a float32 master copy)"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    output_dir: str | None = field(default=None, metadata={"help": "where Δw, config and metrics are written"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace a run already in output_dir (the old run is kept until the new one is complete)"})
    # -- differential privacy (taft.privacy): set dp_epsilon to train with DP-SGD ---------------------------------
    dp_epsilon: float | None = field(default=None, metadata={
        "help": "train with differential privacy at this ε, 0 < ε ≤ 100 (DP-SGD on Δw; σ calibrated to the planned "
                "steps)"})
    dp_delta: float = field(default=1e-5, metadata={"help": "DP δ (must be ≤ 1/N for N training examples)"})
    dp_clip: float = field(default=1.0, metadata={"help": "DP per-example gradient norm bound C"})
    dp_accountant: str = field(default="rdp", metadata={"help": "DP accountant (Opacus): rdp | prv"})
    dp_full_batch: bool = field(default=False, metadata={
        "help": "DP-GD: one step per epoch on the whole training set instead of Poisson-sampled batches"})
    dp_clipping: str = field(default="fast", metadata={
        "help": "per-example clipping: fast (ghost norms + book-keeping, no per-example gradients) | per-example "
                "(the reference: per-example gradients materialized); the same step either way"})
    dp_micro_batch: int | None = field(default=None, metadata={
        "help": "examples per micro-batch of a private step (memory bound; they add into one noisy step); default: "
                "the batch size up to 128 (fast), 32 (per-example)"})

    def __post_init__(self) -> None:
        coerce_fields(self)
        _check_choice("method", self.method, METHODS)
        for name, value in METHOD_DEFAULTS.get(self.method, METHOD_DEFAULTS["*"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("head_init", self.head_init, HEAD_INITS)
        _check_choice("prediction", self.prediction, ("full", "linear-part"))
        if self.prediction != "full" and self.method != "taft":
            raise ConfigError(f"prediction={self.prediction}: only a tangent model (method taft) has a linearized "
                              f"part; method {self.method} predicts with its own output (drop --prediction)")
        _check_choice("cache", self.cache, ("memory", "disk", "none"))
        _check_choice("dtype", self.dtype, DTYPES)
        for name in ("epochs", "min_steps", "batch_size", "eval_batch_size", "max_length", "probe_epochs",
                     "step_epochs", "lora_r", "max_train", "max_eval", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {value}")
        for name in ("lr", "probe_lr", "kappa", "rsl_m", "step_gamma", "lora_alpha", "radius"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.penalty < 0:
            raise ConfigError(f"penalty must be ≥ 0, got {self.penalty}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a fraction of all steps: need 0 ≤ warmup < 1, got {self.warmup}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"num_classes must be ≥ 2 (a classifier needs two classes), got {self.num_classes}")
        if self.class_names is not None:
            self.class_names = resolve_class_names(self.class_names)
            count = len(class_name_list(self.class_names))
            if self.num_classes is not None and self.num_classes != count:
                raise ConfigError(f"class_names gives {count} names but num_classes={self.num_classes}; give one "
                                  f"name per class with --class-names, or drop --num-classes")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in 0..2**63-1, got {self.seed}")
        for name in ("model", "data"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} is empty")
        for name in ("data_root", "test_file", "cache_dir", "output_dir"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ConfigError(f"{name} is an empty path; leave it out or name a path")
        parse_device(self.device)
        check_scope_syntax(self.scope)
        if self.method in ("lora", "adapter") and not re.fullmatch(r"last(:[1-9][0-9]*)?", self.scope):
            raise ConfigError(f"method={self.method} adds adapters to the last k blocks only; use scope last:K, "
                              f"not {self.scope!r}")
        if self.cache == "disk" and not self.cache_dir:
            raise ConfigError("cache=disk needs cache_dir (a folder reused across runs)")
        self._check_privacy()

    def epochs_for(self, n: int) -> int:
        """Epochs a run on ``n`` training examples takes: ``epochs``, raised to reach ``min_steps`` optimizer steps."""
        if not self.min_steps:
            return self.epochs
        per_epoch = 1 if self.dp_full_batch else math.ceil(max(n, 1) / self.batch_size)
        return max(self.epochs, math.ceil(self.min_steps / per_epoch))

    def _check_privacy(self) -> None:
        _check_choice("dp_accountant", self.dp_accountant, ("rdp", "prv"))
        _check_choice("dp_clipping", self.dp_clipping, ("fast", "per-example"))
        if self.dp_micro_batch is not None and self.dp_micro_batch < 1:
            raise ConfigError(f"dp_micro_batch must be ≥ 1, got {self.dp_micro_batch}")
        if self.dp_epsilon is None:
            if self.dp_full_batch:
                raise ConfigError("dp_full_batch is a private-training option; set --dp-epsilon too")
            return
        check_dp_epsilon(self.dp_epsilon)
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp_delta must be in (0, 1), got {self.dp_delta}; use one well below 1/N, e.g. 1e-5")
        if self.dp_clip <= 0:
            raise ConfigError(f"dp_clip must be > 0, got {self.dp_clip}")
        if self.method not in ("taft", "nlft"):
            raise ConfigError(f"dp_epsilon: private training is implemented for method taft and nlft (use "
                              f"--method nlft --scope head for a private linear probe), not {self.method!r}")
        if self.head_init == "probe":
            raise ConfigError("dp_epsilon: head_init=probe fits the head on the training data without privacy; "
                              "use --head-init zero-shot (class descriptions), random or zeros")
        if self.dtype != "float32":
            raise ConfigError(f"dp_epsilon: private training runs in float32 (the per-example gradients and their "
                              f"clipping are not checked in {self.dtype}); drop --dtype {self.dtype}")


# A shard store's own defaults (`taft shards train`, `taft shards search`, :func:`store_config`): a data-independent
# head (w0 must hold nothing a forget removes), and a step budget that does not shrink with the shards (chosen on
# validation: benchmarks/results/shard_budget.md; min_steps 1 turns it off). A TAFT store's learning rate, chosen on
# validation over TREC, SST-2 and MR at K = 10 and 50 (benchmarks/results/shard_defaults.md: 3e-3 above 1e-3 in 5 of
# 6 cells, level in the sixth, above 1e-2 on average); other methods keep their own default.
STORE_DEFAULTS: dict[str, Any] = {"head_init": "zero-shot", "min_steps": 100}
STORE_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"taft": {"lr": 3e-3}}


def store_config(**options: Any) -> TrainConfig:
    """A :class:`TrainConfig` for a shard store: the options given, and for every other the store's default (what
    ``taft shards train`` uses), else the library's. An option given as None counts as not given, as an untyped
    flag does (``min_steps=1`` turns the step budget off).

    >>> store_config(data="trec").lr, store_config(data="trec", lr=1e-3).lr, store_config(method="nlft").lr
    (0.003, 0.001, 0.001)
    """
    given = {k: v for k, v in options.items() if v is not None}
    method = given.get("method", TrainConfig.method)
    return TrainConfig(**{**STORE_DEFAULTS, **STORE_METHOD_DEFAULTS.get(method, {}), **given})
