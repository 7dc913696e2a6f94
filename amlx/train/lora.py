"""LoRA: low-rank adapters on a model's linear layers (QLoRA on quantized ones).

An adapted layer computes ``y = base(x) + scale * (dropout(x) @ A^T) @ B^T``
with ``A`` (rank, in) and ``B`` (out, rank), the orientation of Hugging Face
PEFT. A starts like PEFT's (uniform in +-1/sqrt(in), what kaiming-uniform with
a = sqrt(5) gives) and B at zero, so a fresh adapter leaves the model's output
unchanged. ``scale`` is alpha / rank (alpha / sqrt(rank) with rsLoRA). Only
``lora_a`` / ``lora_b`` are trained; the base weights (dense or quantized) stay
frozen.

`LoRALinear` keeps the base layer's arrays under their own names, so the
model's parameter names stay the checkpoint's (``...q_proj.weight``,
``...q_proj.scales``) and the adapter adds ``...q_proj.lora_a`` and
``...q_proj.lora_b``.

Adapter directory, amlx's format (written by `save_adapter`):

* ``adapters.safetensors``: for every adapted layer ``<path>.lora_a`` (rank, in)
  and ``<path>.lora_b`` (out, rank), float32, ``<path>`` the layer's dotted name
  in the text model (``model.layers.3.self_attn.q_proj``). Its metadata holds a
  copy of the config it was saved with (``adapter_config``) and its ``pair_id``.
* ``adapter_config.json``: ``{"format": "amlx-lora", "version": 1, "rank",
  "alpha", "dropout", "use_rslora", "targets", "num_layers", "layers",
  "modules": {path: {"rank": r, "scale": s}}, "base_model": {...}, "pair_id"}``;
  the per-module ``scale`` is what the layer multiplies by. ``base_model.architecture`` names
  the architecture of the model it was saved from (``qwen3``); `load_adapter` refuses the
  adapter on a model of another one. When its ``pair_id``
  is not the weights' (a save cut short between the two files), the copy in the
  weights is read instead.

`load_adapter` also reads Hugging Face PEFT adapters (``adapter_model.safetensors``
plus a PEFT ``adapter_config.json``) and mlx-lm adapters (``adapters.safetensors``
whose config has ``lora_parameters``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from amlx._mlx import Array, io, ops, random
from amlx._mlx import eval as mx_eval
from amlx._mlx import float32 as _f32
from amlx.checkpoint import (check_creatable, check_destination, copy_carried, read_checkpoint, read_header, read_json,
                             read_tensors, staged_directory, write_config, write_weights)
from amlx.errors import MLXError, ModelLoadError
from amlx.models.nn import Linear, Module, QuantizedLinear, linear, weight_t
from amlx.models.registry import architectures

__all__ = ["DEFAULT_TARGETS", "LoRALinear", "LoRAConfig", "apply_lora", "remove_lora", "lora_modules",
           "save_adapter", "load_adapter", "apply_adapter", "fuse_lora", "fuse", "set_dropout_keys",
           "ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "PEFT_WEIGHTS"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FORMAT = "amlx-lora"
# In an amlx adapter's weights metadata: the config saved with them (json) and its pair_id.
PAIR_ID = "pair_id"
EMBEDDED_CONFIG = "adapter_config"

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class LoRALinear(Module):
    """A linear layer (dense or MLX-quantized) with a low-rank update."""

    def __init__(self, base: Module, rank: int, scale: float, dropout: float = 0.0, *,
                 lora_a: Array | None = None, lora_b: Array | None = None, key: Array | None = None):
        if not isinstance(base, (Linear, QuantizedLinear)):
            raise TypeError(f"LoRA wraps Linear or QuantizedLinear layers, not {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, not {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), not {dropout!r}")
        self.weight = base.weight
        self._quantized = isinstance(base, QuantizedLinear)
        if self._quantized:
            self.scales, self.biases = base.scales, base.biases
            self._group_size, self._bits = base._group_size, base._bits
        bias = getattr(base, "bias", None)
        if bias is not None:
            self.bias = bias
        out_f, in_f = self.out_features, self.in_features
        if lora_a is None:
            bound = 1.0 / math.sqrt(in_f)
            lora_a = random.uniform(-bound, bound, (rank, in_f), _f32, key=key)
        if lora_b is None:
            lora_b = ops.zeros((out_f, rank), _f32)
        if tuple(lora_a.shape) != (rank, in_f) or tuple(lora_b.shape) != (out_f, rank):
            raise ValueError(f"LoRA weights of shapes {tuple(lora_a.shape)} and {tuple(lora_b.shape)} do not fit a "
                             f"({out_f}, {in_f}) layer with rank {rank} (expected ({rank}, {in_f}) and "
                             f"({out_f}, {rank}))")
        self.lora_a, self.lora_b = lora_a, lora_b
        self.scale = float(scale)
        self.dropout = float(dropout)
        self._dropout_key: Array | None = None

    # The base layer's shape and output, from the arrays held here.
    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        w = self.weight.shape[1]
        return w * 32 // self._bits if self._quantized else w

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def _base(self, x: Array) -> Array:
        return linear(x, self, quantized=self._quantized)

    def derived_arrays(self) -> list[Array]:
        return [] if self._quantized else [weight_t(self)]

    def __call__(self, x: Array) -> Array:
        y = self._base(x)
        h = x
        if self.dropout and self._dropout_key is not None:
            keep = random.uniform(0.0, 1.0, x.shape, _f32, key=self._dropout_key) >= self.dropout
            h = ops.where(keep, x * (1.0 / (1.0 - self.dropout)), ops.zeros((), x.dtype))
        z = (h @ ops.transpose(self.lora_a)) @ ops.transpose(self.lora_b)
        return y + (z * self.scale).astype(y.dtype)

    def base_layer(self) -> Module:
        """The wrapped layer alone (sharing its arrays)."""
        bias = getattr(self, "bias", None)
        if self._quantized:
            return QuantizedLinear(self.weight, self.scales, self.biases, self._group_size, self._bits, bias=bias)
        return Linear(self.weight, bias)

    def delta(self, dtype=_f32) -> Array:
        """scale * B @ A, shaped like the dense weight."""
        return ((self.lora_b @ self.lora_a) * self.scale).astype(dtype)

    def fused(self, dequantize: bool = False) -> Module:
        """A plain layer with the update merged into its weight. A quantized base is
        re-quantized with its own group size and bits, unless `dequantize`."""
        bias = getattr(self, "bias", None)
        if self._quantized:
            w = ops.dequantize(self.weight, self.scales, self.biases, self._group_size, self._bits)
            w = w + self.delta(w.dtype)
            if dequantize:
                return Linear(w, bias)
            wq, scales, biases = ops.quantize(w, self._group_size, self._bits)
            return QuantizedLinear(wq, scales, biases, self._group_size, self._bits, bias=bias)
        w = self.weight
        return Linear((w.astype(_f32) + self.delta()).astype(w.dtype), bias)


# -- applying ---------------------------------------------------------------------

@dataclass
class LoRAConfig:
    """How a model's adapter was made (kept on the model, written with the adapter)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    num_layers: int | None = None
    layers: tuple[int, ...] | None = None
    use_rslora: bool = False
    source: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "num_layers": self.num_layers, "layers": None if self.layers is None else list(self.layers),
                "use_rslora": self.use_rslora}


def lora_modules(model) -> dict[str, LoRALinear]:
    """The model's adapted layers by dotted name."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def _num_model_layers(model) -> int:
    return len(model.model.layers)


def _layer_of(path: str) -> int | None:
    m = _LAYER.match(path)
    return int(m.group(1)) if m else None


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def _check_config(cfg: LoRAConfig, n_layers: int) -> None:
    if isinstance(cfg.rank, bool) or not isinstance(cfg.rank, int) or cfg.rank < 1:
        raise ValueError(f"rank must be an integer >= 1, not {cfg.rank!r}")
    if isinstance(cfg.alpha, bool) or not isinstance(cfg.alpha, (int, float)) or not math.isfinite(cfg.alpha):
        raise ValueError(f"alpha must be a number, not {cfg.alpha!r}")
    if isinstance(cfg.dropout, bool) or not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), not {cfg.dropout!r}")
    cfg.alpha, cfg.dropout = float(cfg.alpha), float(cfg.dropout)
    if isinstance(cfg.targets, str):
        cfg.targets = (cfg.targets,)
    targets = tuple(cfg.targets) if isinstance(cfg.targets, (list, tuple)) else ()
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a non-empty list of module names, not {cfg.targets!r}")
    cfg.targets = targets
    if cfg.num_layers is not None:
        if isinstance(cfg.num_layers, bool) or not isinstance(cfg.num_layers, int) or cfg.num_layers < 1:
            raise ValueError(f"num_layers must be an integer >= 1 or None (all), not {cfg.num_layers!r}")
        if cfg.num_layers > n_layers:
            raise ValueError(f"num_layers={cfg.num_layers} but the model has only {n_layers} layers")
    if cfg.layers is not None:
        if isinstance(cfg.layers, (list, tuple)):
            layers = tuple(cfg.layers)
        elif isinstance(cfg.layers, int) and not isinstance(cfg.layers, bool):
            layers = (cfg.layers,)
        else:
            raise ValueError(f"layers must be a layer index or a list of them, not {cfg.layers!r}")
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"layers: {bad[0]!r} is not a layer index of this model (0..{n_layers - 1})")
        cfg.layers = layers


def _selected_layers(cfg: LoRAConfig, n_layers: int) -> set[int] | None:
    chosen = None
    if cfg.num_layers is not None:
        chosen = set(range(n_layers - cfg.num_layers, n_layers))
    if cfg.layers is not None:
        chosen = set(cfg.layers) if chosen is None else chosen & set(cfg.layers)
    return chosen


def apply_lora(model, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] | str = DEFAULT_TARGETS, num_layers: int | None = None,
               layers: Sequence[int] | None = None, use_rslora: bool = False, seed: int = 0) -> list[str]:
    """Wraps the chosen linear layers of `model` (a CausalLM) in `LoRALinear`.

    targets: module names (``q_proj``) or dotted suffixes (``mlp.down_proj``,
    ``lm_head``) of Linear / QuantizedLinear layers. num_layers: only the last N
    decoder layers (None: all). layers: only these layer indices. Layers already
    adapted are left as they are. Returns the dotted names of the layers wrapped now.
    Raises ValueError when a target matches no linear layer."""
    cfg = LoRAConfig(rank, alpha, dropout, targets, num_layers, layers, bool(use_rslora))
    n_layers = _num_model_layers(model)
    _check_config(cfg, n_layers)
    chosen = _selected_layers(cfg, n_layers)
    todo: list[tuple[str, Module]] = []
    hit: dict[str, bool] = {t: False for t in cfg.targets}
    for path, m in model.named_modules():
        matched = [t for t in cfg.targets if _matches(path, t)]
        if not matched:
            continue
        if not isinstance(m, (Linear, QuantizedLinear, LoRALinear)):
            raise ValueError(f"target {matched[0]!r} matches {path}, a {type(m).__name__}; LoRA adapts linear "
                             f"layers only")
        for t in matched:
            hit[t] = True
        layer = _layer_of(path)
        if chosen is not None and (layer is None or layer not in chosen):
            continue
        if not isinstance(m, LoRALinear):
            todo.append((path, m))
    missing = [t for t, h in hit.items() if not h]
    if missing:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, (Linear,
                                                                                                QuantizedLinear))})
        raise ValueError(f"target {missing[0]!r} matches no linear layer of this model (its linear layers: "
                         f"{', '.join(names)})")
    for path, m in todo:  # (before any layer is replaced)
        w = m.weight.shape
        out_f, in_f = w[0], w[1] * 32 // m._bits if isinstance(m, QuantizedLinear) else w[1]
        if cfg.rank > min(out_f, in_f):
            raise ValueError(f"rank {cfg.rank} is more than {path}'s smaller dimension ({out_f} x {in_f}): a "
                             f"rank above {min(out_f, in_f)} adds nothing but memory")
    keys = random.split(random.key(seed), max(len(todo), 2))
    for i, (path, m) in enumerate(todo):
        model.set_module(path, LoRALinear(m, cfg.rank, cfg.scale, cfg.dropout, key=keys[i]))
    mx_eval(*[a for p, _ in todo for a in (model.get_module(p).lora_a, model.get_module(p).lora_b)])
    if todo and getattr(model, "_lora_config", None) is None:  # (a call that adapted nothing leaves none)
        model._lora_config = cfg
    return [p for p, _ in todo]


def remove_lora(model) -> None:
    """Puts the base layers back in place of every LoRALinear (the adapter is dropped)."""
    for path, m in lora_modules(model).items():
        model.set_module(path, m.base_layer())
        m.lora_a.close()
        m.lora_b.close()
    model._lora_config = None


def set_dropout_keys(model, key: Array | None) -> None:
    """Gives each adapted layer with dropout its own key split from `key` (None: no dropout,
    as at inference). The trainer calls it inside the loss function, per step."""
    mods = [m for m in lora_modules(model).values() if m.dropout]
    if key is None or not mods:
        for m in mods:
            m._dropout_key = None
        return
    keys = random.split(key, max(len(mods), 2))
    for i, m in enumerate(mods):
        m._dropout_key = keys[i]


def fuse_lora(model, dequantize: bool = False) -> list[str]:
    """Merges every adapter into its base weight, in place; returns the fused layer names."""
    mods = lora_modules(model)
    for path, m in mods.items():
        model.set_module(path, m.fused(dequantize))
    fused = [model.get_module(p) for p in mods]
    mx_eval(*[a for f in fused for _, a in f.named_parameters()])
    model._lora_config = None
    return list(mods)


# -- saving -----------------------------------------------------------------------

def save_adapter(model, directory: str | os.PathLike, *, weights_name: str = ADAPTER_WEIGHTS,
                 base_model: dict | None = None) -> Path:
    """Writes the model's adapter (amlx format, see the module docstring) into `directory`.
    `weights_name` names the weights file (e.g. a per-step checkpoint); the config
    is always adapter_config.json.

    The weights file carries a copy of its config and the config's ``pair_id``: both
    files are written aside, then the weights renamed into place, then the config. A
    save that fails before the first rename leaves the previous adapter as it was; one
    that fails between them leaves a config with another ``pair_id``, and `load_adapter`
    then reads the copy saved with the weights: the new adapter whole, never a mix."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA layers to save")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Array] = {}
    for path, m in mods.items():
        tensors[f"{path}.lora_a"] = m.lora_a
        tensors[f"{path}.lora_b"] = m.lora_b
    meta = _adapter_meta(model, mods, base_model)
    text = json.dumps(meta, indent=2) + "\n"
    tmp = d / (".tmp-" + weights_name)  # MLX appends .safetensors to other names
    tmpc = d / (ADAPTER_CONFIG + ".tmp")
    try:
        tmpc.write_text(text, encoding="utf-8")
        io.save_safetensors(tmp, tensors, {"format": "mlx", "adapter": FORMAT, PAIR_ID: meta[PAIR_ID],
                                           EMBEDDED_CONFIG: text})
        os.replace(tmp, d / weights_name)  # the commit point: from here the weights hold their config
        os.replace(tmpc, d / ADAPTER_CONFIG)
    finally:
        for t in (tmp, tmpc):
            t.unlink(missing_ok=True)
    return d


def _adapter_meta(model, mods: dict[str, LoRALinear], base_model: dict | None) -> dict:
    """adapter_config.json's content, with its ``pair_id`` (a digest of the rest: two saves of
    one config share it, so a per-step weights file pairs with the config saved beside it)."""
    cfg = getattr(model, "_lora_config", None) or LoRAConfig()
    ranks = {m.rank for m in mods.values()}
    meta = {"format": FORMAT, "version": 1, **cfg.to_json()}
    if len(ranks) == 1:
        meta["rank"] = ranks.pop()
    meta["modules"] = {p: {"rank": m.rank, "scale": m.scale} for p, m in mods.items()}
    base_model = dict(base_model or {})
    own = _architecture_of(model)
    if own is not None:
        # (load_adapter refuses the adapter on a model of another architecture by this name)
        base_model.setdefault("architecture", own)
    if base_model:
        meta["base_model"] = base_model
    if cfg.source:
        meta["converted_from"] = cfg.source
    meta[PAIR_ID] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return meta


def _paired_config(d: Path) -> dict:
    """The config that goes with the adapter's weights: adapter_config.json (also when edited
    by hand since), unless the weights were saved with a config of another ``pair_id`` or none
    is there (a save that failed between its two renames); then the copy saved in the weights."""
    config = d / ADAPTER_CONFIG
    saved = _saved_config(d / ADAPTER_WEIGHTS)
    if saved is None or os.path.lexists(config):
        meta = _read_config(config)
        if saved is None or meta.get(PAIR_ID) == saved.get(PAIR_ID):
            return meta
    return saved


def _saved_config(weights: Path) -> dict | None:
    """The config an amlx adapter's weights were saved with; None for weights of another
    tool (or of amlx before it kept the pair)."""
    if not weights.is_file():
        return None
    embedded = read_header(weights)[1].get(EMBEDDED_CONFIG)
    if embedded is None:
        return None
    try:
        saved = json.loads(embedded)
    except ValueError as e:
        raise _bad(weights, f"the adapter config saved in its metadata is invalid JSON: {e}") from None
    if not isinstance(saved, dict):
        raise _bad(weights, "the adapter config saved in its metadata is not a JSON object")
    return saved


# -- loading ----------------------------------------------------------------------

def _bad(where, why: str) -> ModelLoadError:
    return ModelLoadError(f"{where}: {why}")


# The largest |scale| (alpha / rank) an adapter may give a layer: far above any real
# adapter's (mlx-lm's default is 20), far below where B @ A * scale overflows.
MAX_SCALE = 1e6


def _value(where, key: str, value, default=..., kind: type = float):
    """A number of an adapter config: `default` when null or absent (required when
    `default` is ...), else a finite number (an integer for kind int), or
    ModelLoadError naming the file and the key."""
    if value is None:
        if default is ...:
            raise _bad(where, f"missing {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (kind is int and int(value) != value):
        raise _bad(where, f"invalid {key!r} = {value!r}: expected {'an integer' if kind is int else 'a finite number'}")
    return kind(value)


def _flag(where, key: str, value) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(where, f"invalid {key!r} = {value!r}: expected true or false")
    return value


def _patterns(where, key: str, value, kind: type) -> dict:
    """PEFT's rank_pattern / alpha_pattern: module patterns (regular expressions) to numbers."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(where, f"invalid {key!r} = {value!r}: expected an object of module patterns")
    for p in value:
        try:
            re.compile(rf"(.*\.)?({p})$")
        except re.error as exc:
            raise _bad(where, f"invalid {key!r}: pattern {p!r} is not a regular expression ({exc})") from None
    return {p: _value(where, f"{key}.{p}", v, ..., kind) for p, v in value.items()}


def _checked(cfg: LoRAConfig, model, where, keys: dict[str, str] | None = None) -> LoRAConfig:
    """`cfg` validated as `apply_lora` validates its arguments; ModelLoadError naming the
    config file and the key (`keys`: the file's names of LoRAConfig's fields, where they differ)."""
    try:
        _check_config(cfg, _num_model_layers(model))
    except ValueError as exc:
        msg = str(exc)
        field = msg.split(" ", 1)[0].rstrip(":")
        if keys and field in keys:
            msg = keys[field] + msg[len(field):]
        raise _bad(where, msg) from None
    return cfg


def _read_config(path: Path) -> dict:
    if not path.exists():
        raise _bad(path.parent, f"no {path.name} (an adapter directory holds {ADAPTER_WEIGHTS} or {PEFT_WEIGHTS} "
                                f"with {ADAPTER_CONFIG})")
    return read_json(path)


def _read_weights(path: Path) -> dict[str, Array]:
    read_header(path)  # a regular safetensors file, or a clear error before MLX opens it
    try:
        arrays, _ = io.load_safetensors(path)
    except MLXError as exc:
        raise _bad(path, f"cannot read the adapter weights ({exc.mlx_message})") from None
    return arrays


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in path.split(".")]


def _check_some(entries: dict[str, dict], weights: Path) -> None:
    """Refuses an adapter without a LoRA matrix for the language model (an empty file, or a PEFT
    adapter of a multimodal model's vision tower alone): it loaded as if applied and changed nothing."""
    if not entries:
        raise _bad(weights, "no LoRA matrices for a layer of the language model: the adapter would change nothing")


def _check_finite(entries: dict[str, dict], weights: Path) -> None:
    """Refuses an adapter holding NaN or infinite values (a training run that diverged): it
    loaded, and every logit came out NaN. One pass over the adapter's small matrices, before
    any layer is replaced."""
    checks = [(path, leaf, ops.all(ops.abs(e[leaf].astype(_f32)) < math.inf))
              for path, e in entries.items() for leaf in ("a", "b") if leaf in e and e[leaf].dtype.is_floating]
    mx_eval(*[ok for *_, ok in checks])
    for path, leaf, ok in sorted(checks, key=lambda c: _natural(c[0])):
        if not ok.item():
            raise _bad(weights, f"layer {path}: lora_{leaf} holds NaN or infinite values")


def _install(model, entries: dict[str, dict], where, cfg: LoRAConfig, weights: Path,
             check: Callable[[], None] | None = None) -> None:
    """entries: layer path -> {"a": (r, in), "b": (out, r), "scale": float}, read from
    the file `weights`. `check`: called once every layer is known to be the model's (an
    adapter of layers the model lacks is named by them first)."""
    modules = dict(model.named_modules())
    absent = sorted((p for p in entries if p not in modules), key=_natural)
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise _bad(where, f"the adapter adapts {absent[0]}{more}, which this model does not have (an adapter for "
                          f"another architecture or size?)")
    if check is not None:
        check()
    _check_finite(entries, weights)
    built: dict[str, LoRALinear] = {}
    for path in sorted(entries, key=_natural):
        e = entries[path]
        if "a" not in e or "b" not in e:
            raise _bad(where, f"layer {path} has only one of its two LoRA matrices")
        m = modules[path]
        if isinstance(m, LoRALinear):
            m = m.base_layer()
        if not isinstance(m, (Linear, QuantizedLinear)):
            raise _bad(where, f"the adapter adapts {path}, a {type(m).__name__}; only linear layers can be adapted")
        for leaf in ("a", "b"):
            if not e[leaf].dtype.is_floating:  # a mislabelled tensor: its bytes are not these numbers
                raise _bad(weights, f"layer {path}: lora_{leaf} has dtype {e[leaf].dtype.name}, expected a "
                                    f"floating-point type")
        if not abs(e["scale"]) <= MAX_SCALE:  # (NaN too)
            raise _bad(where, f"layer {path}: scale {e['scale']!r} (alpha / rank) is not a finite number of at most "
                              f"{MAX_SCALE:g} in magnitude")
        a, b = e["a"].astype(_f32), e["b"].astype(_f32)
        rank = a.shape[0] if a.ndim == 2 else -1
        try:
            built[path] = LoRALinear(m, max(rank, 1), e["scale"], cfg.dropout, lora_a=a, lora_b=b)
        except ValueError as exc:
            raise _bad(where, f"layer {path}: {exc}") from None
    # every layer checked: only now is the model's adapter (if any) replaced, so a bad file
    # leaves it as it was rather than half replaced
    if lora_modules(model):
        remove_lora(model)
    for path, layer in built.items():
        model.set_module(path, layer)
    mx_eval(*[a for e in entries.values() for a in (e["a"], e["b"])])
    model._lora_config = cfg


def _architecture_of(model) -> str | None:
    """The architecture amlx built `model` as (``qwen3``, ``llama``...); None when unknown."""
    arch = getattr(model, "model_type", None)
    return arch if isinstance(arch, str) and arch else None


def _known_architecture(name) -> str | None:
    """The architecture an adapter config's ``base_model.architecture`` names (an architecture or
    a config model_type amlx reads: "gemma3_text" is gemma3); None for anything else."""
    if not isinstance(name, str):
        return None
    found = architectures().get(name)
    if found is not None:
        return found.name
    return name if name in {a.name for a in architectures().values()} else None


def _check_architecture(model, meta: dict, where: Path) -> None:
    """Refuses an amlx adapter saved from a model of another architecture. Layers of the same
    names and shapes (a Qwen3 and a Llama of one size) took it silently, and it changed the
    model's output as noise would. Adapters that do not say (saved by an older amlx, or by
    another tool) load as before."""
    base = meta.get("base_model")
    saved = _known_architecture(base.get("architecture")) if isinstance(base, dict) else None
    own = _architecture_of(model)
    if saved is not None and own is not None and saved != own:
        raise _bad(where, f"the adapter was saved from a {saved} model (base_model.architecture), and this model "
                          f"is a {own} model: an adapter does not apply to another architecture, even where its "
                          f"layers' shapes match")


def _load_amlx(model, d: Path, meta: dict) -> LoRAConfig:
    weights = _read_weights(d / ADAPTER_WEIGHTS)
    modules = meta.get("modules")
    if not isinstance(modules, dict):
        raise _bad(d / ADAPTER_CONFIG, "'modules' is missing or not an object")
    entries: dict[str, dict] = {}
    for name, arr in weights.items():
        path, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b") or path not in modules:
            raise _bad(d / ADAPTER_WEIGHTS, f"unexpected tensor {name!r}")
        entries.setdefault(path, {})["a" if leaf == "lora_a" else "b"] = arr
    _check_some(entries, d / ADAPTER_WEIGHTS)
    where = d / ADAPTER_CONFIG
    for path, info in modules.items():
        if path not in entries:
            raise _bad(d / ADAPTER_WEIGHTS, f"no weights for layer {path}")
        if not isinstance(info, dict) or info.get("scale") is None:
            raise _bad(where, f"module {path} has no valid 'scale'")
        entries[path]["scale"] = _value(where, f"modules.{path}.scale", info["scale"])
    cfg = LoRAConfig(_value(where, "rank", meta.get("rank"), 8, int), _value(where, "alpha", meta.get("alpha"), 16.0),
                     _value(where, "dropout", meta.get("dropout"), 0.0),
                     DEFAULT_TARGETS if meta.get("targets") is None else meta["targets"],
                     meta.get("num_layers"), meta.get("layers"), _flag(where, "use_rslora", meta.get("use_rslora")))
    _install(model, entries, d, _checked(cfg, model, where), d / ADAPTER_WEIGHTS,
             lambda: _check_architecture(model, meta, where))
    return cfg


def _peft_path(name: str, config: dict | None) -> str | None:
    """A PEFT module name -> our text model's path; None for a module outside the
    language model of a multimodal checkpoint (the vision tower, the projector),
    which amlx does not run."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    if config and config.get("multimodal"):
        # transformers 5 nests the text model as model.language_model, 4.x as language_model.model
        for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
            if name.startswith(old):
                return new + name[len(old):]
        if name.startswith("lm_head."):
            return name
        return None
    return name


_PEFT_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias terms", "target_parameters": "LoRA on parameters",
                     "layer_replication": "layer replication", "trainable_token_indices": "trainable tokens",
                     "alora_invocation_tokens": "activated LoRA", "modules_to_save": "modules_to_save"}


def _load_peft(model, d: Path, meta: dict, config: dict | None) -> LoRAConfig:
    where = d / ADAPTER_CONFIG
    peft_type = str(meta.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _bad(where, f"PEFT adapter type {peft_type} is not supported (LoRA only)")
    for key, what in _PEFT_UNSUPPORTED.items():
        if meta.get(key):
            raise _bad(where, f"{what} ({key}=true) is not supported")
    if meta.get("bias", "none") not in ("none", None):
        raise _bad(where, f"bias={meta['bias']!r} is not supported (only 'none': adapters without trained biases)")
    r = _value(where, "r", meta.get("r"), ..., int)
    alpha = _value(where, "lora_alpha", meta.get("lora_alpha"), 8.0)
    dropout = _value(where, "lora_dropout", meta.get("lora_dropout"), 0.0)
    rslora = _flag(where, "use_rslora", meta.get("use_rslora"))
    alpha_pattern = _patterns(where, "alpha_pattern", meta.get("alpha_pattern"), float)
    rank_pattern = _patterns(where, "rank_pattern", meta.get("rank_pattern"), int)
    for key, rank in [("r", r), *((f"rank_pattern.{p}", v) for p, v in rank_pattern.items())]:
        if rank < 1:
            raise _bad(where, f"invalid {key!r} = {rank}: a LoRA rank must be >= 1")
    # fan_in_fan_out only concerns Conv1D bases (GPT-2 style): PEFT itself turns it off
    # for nn.Linear, the only kind these architectures have; A and B are stored as
    # for any linear layer, so it changes nothing here.
    weights = _read_weights(d / PEFT_WEIGHTS)
    entries: dict[str, dict] = {}
    for name, arr in weights.items():
        m = re.match(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", name)
        if not m:
            raise _bad(d / PEFT_WEIGHTS, f"tensor {name!r} is not a LoRA matrix (modules_to_save, embeddings and "
                                         f"biases are not supported)")
        key = _peft_path(m.group(1), None)  # the module's name as PEFT matched it
        path = _peft_path(m.group(1), config)
        if path is None:
            continue
        e = entries.setdefault(path, {"key": key})
        e["a" if m.group(2) == "A" else "b"] = arr
    _check_some(entries, d / PEFT_WEIGHTS)
    for path, e in entries.items():
        key = e.pop("key")
        rank = e["a"].shape[0] if "a" in e and e["a"].ndim == 2 else r  # (other shapes: _install refuses them)
        pk = _pattern_key(rank_pattern, key)
        want = rank_pattern[pk] if pk in rank_pattern else r
        if rank != want:
            raise _bad(d / PEFT_WEIGHTS, f"{key}: lora_A has rank {rank} but the config says {want}")
        ak = _pattern_key(alpha_pattern, key)
        a = alpha_pattern[ak] if ak in alpha_pattern else alpha
        e["scale"] = a / (math.sqrt(rank) if rslora else rank)
    targets = meta.get("target_modules")
    targets = tuple(targets) if isinstance(targets, list) else (
        tuple(sorted({p.rsplit(".", 1)[-1] for p in entries})))
    cfg = LoRAConfig(r, alpha, dropout, targets, None, meta.get("layers_to_transform"), rslora,
                     source={"format": "peft", "path": str(d)})
    keys = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
            "layers": "layers_to_transform"}
    _install(model, entries, d, _checked(cfg, model, where, keys), d / PEFT_WEIGHTS)
    return cfg


def _pattern_key(patterns: dict, key: str) -> str:
    """PEFT's rule: the first pattern p with re.match(rf"(.*\\.)?({p})$", key)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return key


def _load_mlx_lm(model, d: Path, meta: dict, config: dict | None) -> LoRAConfig:
    params = meta.get("lora_parameters")
    if not isinstance(params, dict) or meta.get("fine_tune_type", "lora") != "lora":
        raise _bad(d / ADAPTER_CONFIG, "an mlx-lm adapter config needs 'lora_parameters' and fine_tune_type 'lora' "
                                       "(DoRA and full fine-tunes are not supported)")
    where = d / ADAPTER_CONFIG
    scale = _value(where, "lora_parameters.scale", params.get("scale"), 20.0)
    if abs(scale) > MAX_SCALE:
        raise _bad(where, f"invalid 'lora_parameters.scale' = {scale!r}: more than {MAX_SCALE:g} in magnitude")
    rank = _value(where, "lora_parameters.rank", params.get("rank"), 8, int)
    dropout = _value(where, "lora_parameters.dropout", params.get("dropout"), 0.0)
    entries: dict[str, dict] = {}
    for name, arr in _read_weights(d / ADAPTER_WEIGHTS).items():
        path, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise _bad(d / ADAPTER_WEIGHTS, f"unexpected tensor {name!r}")
        if path.endswith(".linear"):
            path = path[: -len(".linear")]
        if config and config.get("multimodal") and path.startswith("language_model."):
            # mlx-lm's multimodal Gemma 3 holds the text model as `language_model`
            path = path[len("language_model."):]
        # mlx-lm keeps lora_a (in, r) and lora_b (r, out): the transposes of ours.
        entries.setdefault(path, {"scale": scale})["a" if leaf == "lora_a" else "b"] = ops.transpose(arr)
    _check_some(entries, d / ADAPTER_WEIGHTS)
    # mlx-lm's num_layers: the last N layers, -1 (or more than the model has) for all
    n = meta.get("num_layers")
    n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n < _num_model_layers(model) else None
    cfg = LoRAConfig(rank, scale * rank, dropout, tuple(sorted({p.rsplit(".", 1)[-1] for p in entries})), n,
                     source={"format": "mlx-lm", "path": str(d)})
    _install(model, entries, d, _checked(cfg, model, where), d / ADAPTER_WEIGHTS)
    return cfg


def _adapter_dir(adapter) -> Path:
    """`adapter` as the adapter directory it must be: ValueError for what is no path (None was a raw
    TypeError), ModelLoadError for a path that is no directory."""
    if not isinstance(adapter, (str, os.PathLike)):
        raise ValueError(f"adapter must be the path of an adapter directory, not {type(adapter).__name__}")
    d = Path(adapter)
    if not d.is_dir():
        raise _bad(d, "not a directory (expected an adapter directory)")
    return d


def load_adapter(model, adapter: str | os.PathLike, config: dict | None = None) -> LoRAConfig:
    """Applies the adapter saved in directory `adapter` (amlx, PEFT or mlx-lm format)
    to `model`, replacing any adapter it had. `config` is the model's normalised
    config (for the names of multimodal checkpoints). Raises ModelLoadError for a
    missing, corrupt or mismatched adapter, and then leaves the model's adapter as it was."""
    d = _adapter_dir(adapter)
    meta = _paired_config(d)
    peft = (d / PEFT_WEIGHTS).is_file()
    if peft and ("peft_type" in meta or "r" in meta):
        return _load_peft(model, d, meta, config)
    if not (d / ADAPTER_WEIGHTS).is_file():
        if peft:  # (the error said the directory had no adapter_model.safetensors)
            raise _bad(d / ADAPTER_CONFIG, f"not a PEFT adapter config (it has neither 'peft_type' nor 'r'), "
                                           f"though the directory holds {PEFT_WEIGHTS}")
        raise _bad(d, f"no {ADAPTER_WEIGHTS} or {PEFT_WEIGHTS}")
    if meta.get("format") == FORMAT:
        if meta.get("version", 1) != 1:
            raise _bad(d / ADAPTER_CONFIG, f"adapter format version {meta.get('version')!r} is not supported")
        return _load_amlx(model, d, meta)
    if "lora_parameters" in meta:
        return _load_mlx_lm(model, d, meta, config)
    raise _bad(d / ADAPTER_CONFIG, "not an amlx, PEFT or mlx-lm LoRA adapter config")


def apply_adapter(loaded, adapter: str | os.PathLike) -> LoRAConfig:
    """`amlx.load(path, adapter=...)`: applies the adapter to a freshly loaded model
    (a LoadedModel); on failure the model is closed and the error raised."""
    try:
        return load_adapter(loaded.model, adapter, loaded.config)
    except BaseException:
        loaded.model.close()
        raise


# -- fusing into a new checkpoint -------------------------------------------------

def _n_params(tensors: dict[str, Array], bits_of: dict[str, int]) -> int:
    n = 0
    for name, a in tensors.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] in bits_of:
            continue
        base = name.rsplit(".", 1)[0]
        n += a.size * 32 // bits_of[base] if base in bits_of and name.endswith(".weight") else a.size
    return n


def _fused_tensors(loaded, adapter, dequantize: bool, source: dict[str, Array]) -> tuple[dict[str, Array], int]:
    """The checkpoint's tensors with every adapted layer's replaced by its fused
    weights (own handles: the writer closes what it writes) and the parameter count."""
    load_adapter(loaded.model, adapter, loaded.config)
    prefix = loaded.args.weight_prefix
    fused: dict[str, Array | None] = {}
    for p in fuse_lora(loaded.model, dequantize):
        m = loaded.model.get_module(p)
        for leaf in ("weight", "scales", "biases"):
            fused[prefix + p + "." + leaf] = getattr(m, leaf, None)
    out = {name: arr for name, arr in source.items() if name not in fused}
    out.update({name: Array(arr) for name, arr in fused.items() if arr is not None})
    # quantized layers (linear and embedding) count their unpacked parameters
    bits_of = {prefix + p: m._bits for p, m in loaded.model.named_modules() if hasattr(m, "_bits")}
    return out, _n_params(out, bits_of)


def _fused_config(config: dict, out: dict[str, Array]) -> dict:
    """`config` with quantization entries only for what `out` stores quantized: none when no layer
    is, and no per-layer entry of a layer written as floats (dequantize=True). mlx-lm quantizes
    every layer its config names, so the float layer of a mixed-precision checkpoint was
    "Missing 2 parameters: ...scales, ...biases" there."""
    if not any(n.endswith(".scales") for n in out):
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    for key in ("quantization", "quantization_config"):
        q = config.get(key)
        if isinstance(q, dict):
            config[key] = {k: v for k, v in q.items() if not isinstance(v, dict) or f"{k}.scales" in out}
    return config


def _fuse_on_worker(src: Path, adapter, dst: Path, dequantize: bool, progress) -> Path:
    from amlx.convert import mlx_config
    from amlx.models import build_model

    spec = read_checkpoint(src)
    loaded = build_model(spec, progress=False)
    source: dict[str, Array] = {}
    try:
        source = read_tensors(spec)
        out, n_params = _fused_tensors(loaded, adapter, dequantize, source)
        config = _fused_config(mlx_config(spec.raw_config, spec.args, None, None, 64), out)
        units = [([(name, out[name])], Array(out[name])) for name in sorted(out)]
        with staged_directory(dst) as tmp:
            write_weights(tmp, units, n_params, 5 << 30, f"converting {src.name}", progress)
            write_config(tmp, config)
            copy_carried(src, tmp, skip=(ADAPTER_CONFIG,))
    finally:
        for a in source.values():
            a.close()
        loaded.model.close()
    return dst


def fuse(model: str | os.PathLike, adapter: str | os.PathLike, dst: str | os.PathLike, *,
         dequantize: bool = False, progress: bool | None = None) -> Path:
    """Writes a new checkpoint at `dst`: the checkpoint `model` with the adapter merged
    into its weights (W + scale * B @ A). Layers of a quantized checkpoint are
    re-quantized with their own group size and bits, or written as floats with
    `dequantize=True`. Other tensors, the config and the tokenizer files are carried
    over (the weights in the sharded layout of `amlx.convert`). Runs on amlx's
    worker thread and blocks until done; returns `dst`."""
    from amlx.engine.worker import Worker

    src, dst = Path(model), Path(dst)
    check_destination(src, dst)
    check_creatable(dst)  # (a file or a dangling link in its way was a raw OSError once the model was fused)
    _adapter_dir(adapter)  # (before the model loads)
    return Worker.get().run_sync(lambda: _fuse_on_worker(src, adapter, dst, bool(dequantize), progress))

