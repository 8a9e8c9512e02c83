"""The trainer's YAML schema, validated up front into typed dataclasses.

Every user mistake (unknown key, wrong type, missing required field, unknown
registry name, bad ``--set`` override) raises :class:`ConfigError` with a
one-line message; the CLI prints it as ``error: ...`` and exits with code 2
before anything is written to disk.

    cfg = load_config("configs/deadzone_mlp.yaml", overrides=["epochs=3"])
    d = config_to_dict(cfg)          # the resolved config, plain builtins
    cfg == config_from_dict(d)       # round trip
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "Config",
    "QuantizerConfig",
    "ParamGroupConfig",
    "OptimizerConfig",
    "LossTermConfig",
    "DatasetConfig",
    "load_config",
    "load_yaml",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "DEVICE_CHOICES",
    "WANDB_MODES",
    "AUGMENT_CHOICES",
]

DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "mps")
WANDB_MODES = ("online", "offline", "disabled")
AUGMENT_CHOICES = ("standard", "randaugment", "none")
ON_DEVICE_DATASETS = ("cifar10", "synthetic")
GRAPH_OPTIMIZERS = ("adam", "adamw", "sgd")  # cuda_graph: fused optimizer steps that capture
PARAM_GROUP_NAMES = ("base", "dz", "bit")


class ConfigError(Exception):
    """A user mistake in the config, the command line or the environment it
    names (data set path, device, checkpoint).  The message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# ------------------------------------------------------------------ schema --
@dataclass
class QuantizerConfig:
    name: str
    kwargs: dict = field(default_factory=dict)
    exclude_layers: list = field(default_factory=list)


@dataclass
class ParamGroupConfig:
    lr: float
    weight_decay: float = 0.0
    extra: dict = field(default_factory=dict)  # momentum, betas, nesterov, eps, ... passed to the optimizer

    def hparams(self) -> dict:
        out = {"lr": self.lr, "weight_decay": self.weight_decay}
        for k, v in self.extra.items():
            out[k] = tuple(v) if isinstance(v, list) else v
        return out


@dataclass
class OptimizerConfig:
    base: ParamGroupConfig
    type: str = "adamw"
    dz: ParamGroupConfig | None = None
    bit: ParamGroupConfig | None = None


@dataclass
class LossTermConfig:
    name: str
    lam: float = 1.0  # YAML key "lambda"
    kwargs: dict = field(default_factory=dict)


@dataclass
class DatasetConfig:
    name: str = "cifar10"
    root: str = "data"
    download: bool = False
    augment: str = "standard"
    train_size: int | None = None  # synthetic: default 1000; cifar10: a subset of the first N (None = all)
    val_size: int | None = None  # synthetic: default 200; cifar10: a subset of the first N (None = all)
    on_device: bool = False  # hold the data set on the training device, augment there (codeq.train.device_data)


@dataclass
class Config:
    model: str
    epochs: int
    optimizer: OptimizerConfig
    model_kwargs: dict = field(default_factory=dict)
    batch_size: int = 128  # per process: the global batch under DDP is batch_size x world size
    img_size: int = 32
    device: str = "cpu"
    seed: int = 0
    workers: int = 4
    use_compile: bool = False
    fused_weights: bool = True  # eager mode: all quantized weights (+ group lasso) in one fused call (codeq.fastpath)
    cuda_graph: Any = False  # "auto", True or False: replay each training step as one CUDA graph (codeq.train.graph)
    save_dir: str = "save_temp"
    run_name: str | None = None
    lr_scheduler: str = "cosine"
    wandb_project: str | None = None
    wandb_mode: str | None = None
    log_interval: int = 50
    save_best: bool = True
    distributed: Any = "auto"  # "auto" (DDP when launched by torchrun with WORLD_SIZE > 1), True or False
    sync_bn: bool = False
    dist_timeout_min: float = 30.0
    quantizer: QuantizerConfig | None = None
    loss_terms: list = field(default_factory=list)  # list[LossTermConfig]
    dataset: DatasetConfig = field(default_factory=DatasetConfig)


# Keys of each YAML mapping: key -> (kind, default or REQUIRED).  Kinds are
# checked by _check_type; None defaults mean "null allowed".
REQUIRED = object()

_TOP_KEYS = {
    "model": ("str", REQUIRED),
    "epochs": ("int", REQUIRED),
    "optimizer": ("mapping", REQUIRED),
    "model_kwargs": ("mapping", {}),
    "batch_size": ("int", 128),
    "img_size": ("int", 32),
    "device": ("str", "cpu"),
    "seed": ("int", 0),
    "workers": ("int", 4),
    "use_compile": ("bool", False),
    "fused_weights": ("bool", True),
    "cuda_graph": ("autobool", False),
    "save_dir": ("str", "save_temp"),
    "run_name": ("str?", None),
    "lr_scheduler": ("str", "cosine"),
    "wandb_project": ("str?", None),
    "wandb_mode": ("str?", None),
    "log_interval": ("int", 50),
    "save_best": ("bool", True),
    "distributed": ("autobool", "auto"),
    "sync_bn": ("bool", False),
    "dist_timeout_min": ("float", 30.0),
    "quantizer": ("mapping?", None),
    "loss_terms": ("list?", []),
    "dataset": ("mapping?", {}),
}
_QUANT_KEYS = {"name": ("str", REQUIRED), "kwargs": ("mapping?", {}), "exclude_layers": ("strlist", [])}
_OPT_KEYS = {"type": ("str", "adamw"), "param_groups": ("mapping", REQUIRED)}
_LOSS_KEYS = {"name": ("str", REQUIRED), "lambda": ("float", 1.0), "kwargs": ("mapping?", {})}
_DATA_KEYS = {
    "name": ("str", "cifar10"),
    "root": ("str", "data"),
    "download": ("bool", False),
    "augment": ("str", "standard"),
    "train_size": ("int?", None),
    "val_size": ("int?", None),
    "on_device": ("bool", False),
}
_TYPE_WORDS = {
    "str": "a string",
    "str?": "a string or null",
    "int": "an integer",
    "int?": "an integer or null",
    "float": "a number",
    "bool": "true/false (or 1/0)",
    "autobool": "auto, true or false",
    "mapping": "a mapping",
    "mapping?": "a mapping or null",
    "list?": "a list or null",
    "strlist": "a list of strings",
}


def _typename(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "mapping"}.get(
        type(v), type(v).__name__
    )


def _check_type(path: str, v: Any, kind: str) -> Any:
    ok = True
    if kind.endswith("?") and v is None:
        return None
    base = kind.rstrip("?")
    if base == "str":
        ok = isinstance(v, str)
    elif base == "int":
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif base == "float":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok:
            v = float(v)
    elif base == "bool":
        if isinstance(v, bool):
            pass
        elif isinstance(v, int) and v in (0, 1):
            v = bool(v)
        else:
            ok = False
    elif base == "autobool":
        if isinstance(v, str) and v.strip().lower() == "auto":
            v = "auto"
        elif isinstance(v, bool):
            pass
        elif isinstance(v, int) and v in (0, 1):
            v = bool(v)
        else:
            ok = False
    elif base == "mapping":
        ok = isinstance(v, dict)
    elif base == "list":
        ok = isinstance(v, list)
    elif base == "strlist":
        if isinstance(v, str):
            v = [v]
        ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
    if not ok:
        raise ConfigError(f"{path} must be {_TYPE_WORDS[kind]}, got {_typename(v)} {v!r}")
    return v


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_keys(where: str, d: dict, valid) -> None:
    for k in d:
        if k not in valid:
            path = f"{where}.{k}" if where else str(k)
            raise ConfigError(
                f"unknown key '{path}'{_suggest(k, valid)} (valid keys{' of ' + where if where else ''}: "
                f"{', '.join(valid)})"
            )


def _fill(where: str, d: dict | None, schema: dict) -> dict:
    """Check keys and types of one mapping and fill in defaults."""
    d = {} if d is None else d
    _check_keys(where, d, schema)
    out = {}
    for k, (kind, default) in schema.items():
        path = f"{where}.{k}" if where else k
        if k not in d:
            if default is REQUIRED:
                raise ConfigError(f"missing required key '{path}'")
            out[k] = copy.deepcopy(default)
        else:
            out[k] = _check_type(path, d[k], kind)
    return out


def _choice(path: str, value: str, choices, what: str) -> None:
    if value not in choices:
        raise ConfigError(
            f"unknown {what} '{value}' ({path}){_suggest(value, choices)} (choose one of: {', '.join(sorted(choices))})"
        )


def _check_kwargs(path: str, kwargs: dict, fn, what: str, reserved=()) -> None:
    """Keys of a kwargs mapping must be parameters of fn (unless it takes
    **kwargs); ``reserved`` ones are set by the trainer itself."""
    for k in kwargs:
        if k in reserved:
            raise ConfigError(f"'{path}.{k}' cannot be set there: the trainer passes {k} itself")
    names = _accepted_kwargs(fn)
    if names is None:
        return
    names = [n for n in names if n not in reserved]
    for k in kwargs:
        if not isinstance(k, str) or k not in names:
            raise ConfigError(
                f"unknown key '{path}.{k}' for {what}{_suggest(k, names)} (accepted: {', '.join(names) or 'none'})"
            )


def _accepted_kwargs(fn):
    """Keyword names fn accepts, or None when it takes arbitrary **kwargs.  For a
    class whose __init__ only forwards (*args, **kwargs) the base class's
    signature is used (codeq's fused quantizers subclass the reference ones)."""
    import inspect

    targets = [k.__init__ for k in fn.__mro__ if k is not object] if isinstance(fn, type) else [fn]
    for t in targets:
        try:
            params = [p for p in inspect.signature(t).parameters.values() if p.name != "self"]
        except (TypeError, ValueError):
            return None
        var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
        var_pos = any(p.kind == p.VAR_POSITIONAL for p in params)
        named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if var_kw and var_pos and not named and isinstance(fn, type):
            continue  # a forwarding __init__: look at the base class
        return None if var_kw else named
    return None


def _param_group(path: str, d: Any, opt_cls, opt_type: str) -> ParamGroupConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must be a mapping, got {_typename(d)} {d!r}")
    if "lr" not in d:
        raise ConfigError(f"missing required key '{path}.lr'")
    lr = _check_type(f"{path}.lr", d["lr"], "float")
    wd = _check_type(f"{path}.weight_decay", d.get("weight_decay", 0.0), "float")
    extra = {k: v for k, v in d.items() if k not in ("lr", "weight_decay")}
    import inspect

    params = inspect.signature(opt_cls.__init__).parameters
    valid = [n for n in params if n not in ("self", "params")]
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        for k in extra:
            if k not in valid:
                raise ConfigError(
                    f"unknown key '{path}.{k}' for optimizer '{opt_type}'{_suggest(k, valid)} "
                    f"(accepted: {', '.join(valid)})"
                )
    return ParamGroupConfig(lr=lr, weight_decay=wd, extra=dict(extra))


def _check_device(dev: str) -> None:
    if dev in ("cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", dev):
        return
    raise ConfigError(f"unknown device '{dev}' (device); choose one of: {', '.join(DEVICE_CHOICES)}")


def config_from_dict(d: dict) -> Config:
    """Validate a raw config mapping (as read from YAML) into a :class:`Config`.

    Raises :class:`ConfigError` with a one-line message on the first problem.
    """
    from codeq.registry import LOSS_REGISTRY, QUANTIZER_REGISTRY
    from codeq.train.build import DATASET_REGISTRY, MODEL_REGISTRY, OPTIMIZER_REGISTRY, SCHEDULER_REGISTRY

    if not isinstance(d, dict):
        raise ConfigError(f"the config must be a mapping of keys to values, got {_typename(d)}")
    top = _fill("", d, _TOP_KEYS)

    _choice("model", top["model"], MODEL_REGISTRY, "model")
    _check_kwargs("model_kwargs", top["model_kwargs"], MODEL_REGISTRY[top["model"]], f"model '{top['model']}'",
                  reserved=("num_classes", "img_size"))
    for k in ("epochs", "batch_size", "img_size", "log_interval"):
        if top[k] < 1:
            raise ConfigError(f"{k} must be at least 1, got {top[k]}")
    for k in ("workers", "seed"):
        if top[k] < 0:
            raise ConfigError(f"{k} must be 0 or more, got {top[k]}")
    _check_device(top["device"])
    if not 0 < top["dist_timeout_min"] < float("inf"):
        raise ConfigError(f"dist_timeout_min must be more than 0 (minutes), got {top['dist_timeout_min']}")
    _choice("lr_scheduler", top["lr_scheduler"], SCHEDULER_REGISTRY, "lr_scheduler")
    if top["wandb_mode"] is not None:
        _choice("wandb_mode", top["wandb_mode"], WANDB_MODES, "wandb_mode")
    if top["run_name"] is not None and (not top["run_name"] or os.sep in top["run_name"]):
        raise ConfigError(f"run_name must be a non-empty name without '{os.sep}', got {top['run_name']!r}")

    quant = None
    if top["quantizer"] is not None:
        q = _fill("quantizer", top["quantizer"], _QUANT_KEYS)
        _choice("quantizer.name", q["name"], QUANTIZER_REGISTRY, "quantizer")
        kw = q["kwargs"] or {}
        _check_kwargs("quantizer.kwargs", kw, QUANTIZER_REGISTRY[q["name"]], f"quantizer '{q['name']}'")
        quant = QuantizerConfig(name=q["name"], kwargs=dict(kw), exclude_layers=list(q["exclude_layers"]))

    o = _fill("optimizer", top["optimizer"], _OPT_KEYS)
    _choice("optimizer.type", o["type"], OPTIMIZER_REGISTRY, "optimizer")
    if top["cuda_graph"] is True:  # "auto" turns itself off where graphs cannot run
        if top["use_compile"]:
            raise ConfigError("cuda_graph and use_compile cannot be combined (torch.compile captures graphs its own "
                              "way); set one of them to false")
        if o["type"] not in GRAPH_OPTIMIZERS:
            raise ConfigError(f"cuda_graph works with the optimizers {', '.join(GRAPH_OPTIMIZERS)} (their fused, "
                              f"capturable CUDA steps), not '{o['type']}'; set cuda_graph: auto or false")
    opt_cls = OPTIMIZER_REGISTRY[o["type"]]
    groups = o["param_groups"]
    _check_keys("optimizer.param_groups", groups, PARAM_GROUP_NAMES)
    if "base" not in groups:
        raise ConfigError("missing required key 'optimizer.param_groups.base'")
    pg = {
        name: (_param_group(f"optimizer.param_groups.{name}", groups[name], opt_cls, o["type"]) if name in groups else None)
        for name in PARAM_GROUP_NAMES
    }
    optimizer = OptimizerConfig(type=o["type"], base=pg["base"], dz=pg["dz"], bit=pg["bit"])

    terms = []
    for i, t in enumerate(top["loss_terms"] or []):
        where = f"loss_terms[{i}]"
        if not isinstance(t, dict):
            raise ConfigError(f"{where} must be a mapping with name/lambda/kwargs, got {_typename(t)} {t!r}")
        t = _fill(where, t, _LOSS_KEYS)
        _choice(f"{where}.name", t["name"], LOSS_REGISTRY, "loss term")
        kw = t["kwargs"] or {}
        _check_kwargs(f"{where}.kwargs", kw, LOSS_REGISTRY[t["name"]], f"loss term '{t['name']}'", reserved=("model",))
        terms.append(LossTermConfig(name=t["name"], lam=t["lambda"], kwargs=dict(kw)))

    ds = _fill("dataset", top["dataset"], _DATA_KEYS)
    _choice("dataset.name", ds["name"], DATASET_REGISTRY, "dataset")
    _choice("dataset.augment", ds["augment"], AUGMENT_CHOICES, "augmentation")
    for k in ("train_size", "val_size"):
        if ds[k] is not None and ds[k] < 1:
            raise ConfigError(f"dataset.{k} must be at least 1 (or null), got {ds[k]}")
    if ds["on_device"]:
        if ds["name"] not in ON_DEVICE_DATASETS:
            raise ConfigError(f"dataset.on_device works for {' and '.join(ON_DEVICE_DATASETS)} (CIFAR-shaped data "
                              f"held on the device), not '{ds['name']}'; set dataset.on_device: false")
        if ds["augment"] == "randaugment":
            raise ConfigError("dataset.on_device supports augment: standard or none (crop + flip on the device), "
                              "not randaugment; set dataset.on_device: false for RandAugment")
    dataset = DatasetConfig(**ds)

    return Config(
        model=top["model"],
        epochs=top["epochs"],
        optimizer=optimizer,
        model_kwargs=dict(top["model_kwargs"]),
        batch_size=top["batch_size"],
        img_size=top["img_size"],
        device=top["device"],
        seed=top["seed"],
        workers=top["workers"],
        use_compile=top["use_compile"],
        fused_weights=top["fused_weights"],
        cuda_graph=top["cuda_graph"],
        save_dir=top["save_dir"],
        run_name=top["run_name"],
        lr_scheduler=top["lr_scheduler"],
        wandb_project=top["wandb_project"],
        wandb_mode=top["wandb_mode"],
        log_interval=top["log_interval"],
        save_best=top["save_best"],
        distributed=top["distributed"],
        sync_bn=top["sync_bn"],
        dist_timeout_min=top["dist_timeout_min"],
        quantizer=quant,
        loss_terms=terms,
        dataset=dataset,
    )


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as a plain dict of builtins, in the YAML schema
    (``config_from_dict(config_to_dict(cfg)) == cfg``)."""

    def group(g: ParamGroupConfig | None):
        if g is None:
            return None
        return {"lr": g.lr, "weight_decay": g.weight_decay, **copy.deepcopy(g.extra)}

    groups = {"base": group(cfg.optimizer.base)}
    for name in ("dz", "bit"):
        g = group(getattr(cfg.optimizer, name))
        if g is not None:
            groups[name] = g
    out = {
        "model": cfg.model,
        "model_kwargs": copy.deepcopy(cfg.model_kwargs),
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "img_size": cfg.img_size,
        "device": cfg.device,
        "seed": cfg.seed,
        "workers": cfg.workers,
        "use_compile": bool(cfg.use_compile),
        "fused_weights": bool(cfg.fused_weights),
        "cuda_graph": cfg.cuda_graph,
        "save_dir": cfg.save_dir,
        "run_name": cfg.run_name,
        "lr_scheduler": cfg.lr_scheduler,
        "wandb_project": cfg.wandb_project,
        "wandb_mode": cfg.wandb_mode,
        "log_interval": cfg.log_interval,
        "save_best": bool(cfg.save_best),
        "distributed": cfg.distributed,
        "sync_bn": bool(cfg.sync_bn),
        "dist_timeout_min": float(cfg.dist_timeout_min),
        "quantizer": None
        if cfg.quantizer is None
        else {
            "name": cfg.quantizer.name,
            "kwargs": copy.deepcopy(cfg.quantizer.kwargs),
            "exclude_layers": list(cfg.quantizer.exclude_layers),
        },
        "optimizer": {"type": cfg.optimizer.type, "param_groups": groups},
        "loss_terms": [{"name": t.name, "lambda": t.lam, "kwargs": copy.deepcopy(t.kwargs)} for t in cfg.loss_terms],
        "dataset": dataclasses.asdict(cfg.dataset),
    }
    return out


# -------------------------------------------------------------- YAML + CLI --
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.2; PyYAML's YAML
    1.1 resolver needs a dot, ``1.0e-3``, and would give the string "1e-3")."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text):
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            d = parse_yaml(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, got {_typename(d)}")
    return d


def apply_overrides(d: dict, overrides) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a
    copy of the raw config mapping.  List items are addressed by index
    (``loss_terms.0.lambda=0.5``)."""
    d = copy.deepcopy(d)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set expects key.sub=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"--set expects key.sub=value, got {item!r}")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = d
        for i, p in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = node[_index(where, p, node)]
                continue
            if p not in node or node[p] is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {key}: '{where}' is {_typename(node)} {node!r}, not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            node[_index(key, last, node)] = value
        else:
            node[last] = value
    return d


def _index(where: str, p: str, node: list) -> int:
    if not p.isdigit() or int(p) >= len(node):
        raise ConfigError(f"--set: '{where}' must be an index below {len(node)} of the list")
    return int(p)


def load_config(path: str, overrides=(), device: str | None = None) -> Config:
    """Read, override (``--set``), apply ``--device`` and validate a YAML config."""
    d = apply_overrides(load_yaml(path), overrides)
    if device is not None:
        d["device"] = device
    return config_from_dict(d)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("# resolved config of this run (defaults filled in, overrides applied)\n")
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
