"""AdamW and learning-rate schedules.

`AdamW` follows `torch.optim.AdamW` exactly (bias-corrected moments,
decoupled weight decay applied before the Adam update, eps added after the
square root), optionally with global-norm gradient clipping done the way
`torch.nn.utils.clip_grad_norm_` does it. Parameters and gradients are dicts
{name: array}; the moments are kept in float32 whatever the parameters' dtype.

State on disk: `optimizer.safetensors` (tensors `m.<name>` and `v.<name>`)
next to `optimizer.json` (`{"format": "amlx-adamw", "version": 1, "step": int,
"hyperparameters": {...}, "weights_sha256": ..., "paired_with": {"file": ...,
"sha256": ...}}`). The two digests tie the JSON to the tensors written with it and
to the adapter file saved beside them: the files are written one after another,
so a save cut short (a crash, a full disk) can leave a mismatched set, which a
resume would otherwise take for a consistent one (older moments and step with
newer adapter weights). States written before the digests load as before.

Schedules map the number of updates already made (0 for the first update) to
a learning rate: `constant`, or a linear warm-up followed by `cosine` or
`linear` decay to `min_lr` at `total_steps`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

from amlx._mlx import Array, io, ops
from amlx._mlx import float32 as _f32

__all__ = ["AdamW", "clip_grad_norm", "file_sha256", "global_norm", "make_schedule", "constant", "warmup_cosine", "warmup_linear",
           "Schedule"]

Schedule = Callable[[int], float]

OPTIMIZER_WEIGHTS = "optimizer.safetensors"
OPTIMIZER_CONFIG = "optimizer.json"


# -- schedules -------------------------------------------------------------------

def _check_lr(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    return float(value)


def _check_steps(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, not {value!r}")
    return value


def constant(lr: float) -> Schedule:
    lr = _check_lr(lr, "learning rate")
    return lambda step: lr


def _warmup(lr: float, warmup: int, after: Callable[[int], float]) -> Schedule:
    def schedule(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return after(step)

    return schedule


def _warmup_decay(lr: float, total_steps: int, warmup: int, min_lr: float,
                  shape: Callable[[float], float]) -> Schedule:
    """Linear warm-up over `warmup` updates to `lr`, then a decay to `min_lr` at update
    `total_steps` whose form is `shape` (1 at the decay's start, 0 at its end, over t in [0, 1])."""
    lr, min_lr = _check_lr(lr, "learning rate"), _check_lr(min_lr, "min_lr")
    total_steps, warmup = _check_steps(total_steps, "total_steps", 1), _check_steps(warmup, "warmup")
    span = max(total_steps - warmup, 1)

    def decay(step: int) -> float:
        t = min(max(step - warmup, 0) / span, 1.0)
        return min_lr + (lr - min_lr) * shape(t)

    return _warmup(lr, warmup, decay)


def warmup_cosine(lr: float, total_steps: int, warmup: int = 0, min_lr: float = 0.0) -> Schedule:
    """Linear warm-up over `warmup` updates to `lr`, then cosine decay to `min_lr`
    at update `total_steps`."""
    return _warmup_decay(lr, total_steps, warmup, min_lr, lambda t: 0.5 * (1.0 + math.cos(math.pi * t)))


def warmup_linear(lr: float, total_steps: int, warmup: int = 0, min_lr: float = 0.0) -> Schedule:
    """Linear warm-up over `warmup` updates to `lr`, then linear decay to `min_lr`
    at update `total_steps`."""
    return _warmup_decay(lr, total_steps, warmup, min_lr, lambda t: 1.0 - t)


SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(kind: str, lr: float, total_steps: int, warmup: int = 0, min_lr: float = 0.0) -> Schedule:
    """A schedule by name: "constant" (after an optional warm-up), "cosine" or "linear"."""
    if kind == "cosine":
        return warmup_cosine(lr, total_steps, warmup, min_lr)
    if kind == "linear":
        return warmup_linear(lr, total_steps, warmup, min_lr)
    if kind == "constant":
        base = constant(lr)
        return _warmup(base(0), _check_steps(warmup, "warmup"), base) if warmup else base
    raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, not {kind!r}")


# -- clipping --------------------------------------------------------------------

def global_norm(grads: dict[str, Array]) -> Array:
    """The L2 norm of all gradients together (a float32 scalar)."""
    total = None
    for g in grads.values():
        s = ops.sum(ops.square(g.astype(_f32)))
        total = s if total is None else total + s
    return ops.sqrt(total) if total is not None else ops.zeros((), _f32)


def clip_grad_norm(grads: dict[str, Array], max_norm: float) -> tuple[dict[str, Array], Array]:
    """(grads scaled so their global norm is at most `max_norm`, the norm before).

    As torch.nn.utils.clip_grad_norm_: scale = min(1, max_norm / (norm + 1e-6))."""
    norm = global_norm(grads)
    scale = ops.minimum(max_norm / (norm + 1e-6), 1.0)
    return {k: (g.astype(_f32) * scale).astype(g.dtype) for k, g in grads.items()}, norm


# -- AdamW -----------------------------------------------------------------------

class AdamW:
    """AdamW over dicts of parameters.

    `lr` is a number or a schedule (a function of the update count). `update`
    returns the new parameters and keeps the moments; the caller puts the new
    parameters wherever they live (e.g. `model.update(new)`)."""

    def __init__(self, lr: float | Schedule = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, max_grad_norm: float | None = None):
        if callable(lr):
            self.schedule: Schedule = lr
        else:
            self.schedule = constant(lr)
        b1, b2 = betas
        for name, b in (("beta1", b1), ("beta2", b2)):
            if not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), not {b!r}")
        if not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"eps must be >= 0, not {eps!r}")
        _check_lr(weight_decay, "weight_decay")
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or max_grad_norm <= 0:
                raise ValueError(f"max_grad_norm must be a number > 0 or None, not {max_grad_norm!r}")
        self.betas = (float(b1), float(b2))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.step = 0  # updates made so far
        self.m: dict[str, Array] = {}
        self.v: dict[str, Array] = {}
        self.paired_sha256: str | None = None  # set by `load`: the digest of the file saved with the state
        self.last_grad_norm: Array | None = None

    @property
    def learning_rate(self) -> float:
        """The learning rate of the next update."""
        return float(self.schedule(self.step))

    def hyperparameters(self) -> dict:
        return {"betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
                "max_grad_norm": self.max_grad_norm}

    def update(self, params: dict[str, Array], grads: dict[str, Array]) -> dict[str, Array]:
        """One AdamW step: the new parameters (lazy arrays; evaluate them with the state)."""
        missing = [k for k in params if k not in grads]
        if missing:
            raise KeyError(f"no gradient for parameter {missing[0]!r}")
        lr = self.learning_rate
        if self.max_grad_norm is not None:
            grads, self.last_grad_norm = clip_grad_norm({k: grads[k] for k in params}, self.max_grad_norm)
        b1, b2 = self.betas
        t = self.step + 1
        bc1 = 1.0 - b1 ** t
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        step_size = lr / bc1
        decay = 1.0 - lr * self.weight_decay
        new: dict[str, Array] = {}
        for name, p in params.items():
            g = grads[name].astype(_f32)
            m = self.m.get(name)
            v = self.v.get(name)
            m = (1.0 - b1) * g if m is None else b1 * m + (1.0 - b1) * g
            v = (1.0 - b2) * ops.square(g) if v is None else b2 * v + (1.0 - b2) * ops.square(g)
            self.m[name], self.v[name] = m, v
            p32 = p.astype(_f32)
            if self.weight_decay:
                p32 = p32 * decay
            denom = ops.sqrt(v) / bc2_sqrt + self.eps
            new[name] = (p32 - step_size * (m / denom)).astype(p.dtype)
        self.step = t
        return new

    def state(self) -> list[Array]:
        """The moment arrays (to evaluate together with the new parameters)."""
        return [*self.m.values(), *self.v.values()]

    # -- persistence ---------------------------------------------------------
    def state_dict(self) -> dict:
        """{"step", "hyperparameters", "m": {name: array}, "v": {name: array}}."""
        return {"step": self.step, "hyperparameters": self.hyperparameters(), "m": dict(self.m),
                "v": dict(self.v)}

    def load_state_dict(self, state: dict) -> None:
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"optimizer state has an invalid step {step!r}")
        m, v = dict(state.get("m") or {}), dict(state.get("v") or {})
        if set(m) != set(v):
            raise ValueError("optimizer state: the first and second moments name different parameters")
        self.step, self.m, self.v = step, m, v

    def save(self, directory: str | os.PathLike, paired_with: str | os.PathLike | None = None) -> None:
        """Writes optimizer.safetensors and optimizer.json into `directory`; `paired_with`: the
        file (an adapter) this state goes with, whose digest `load` reads back (`paired_sha256`)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"m.{k}": a for k, a in self.m.items()}
        tensors.update({f"v.{k}": a for k, a in self.v.items()})
        tmp = d / (".tmp-" + OPTIMIZER_WEIGHTS)  # MLX appends .safetensors to other names
        io.save_safetensors(tmp, tensors, {"format": "mlx"})
        os.replace(tmp, d / OPTIMIZER_WEIGHTS)
        meta = {"format": "amlx-adamw", "version": 1, "step": self.step, "hyperparameters": self.hyperparameters(),
                "weights_sha256": file_sha256(d / OPTIMIZER_WEIGHTS)}
        if paired_with is not None:
            meta["paired_with"] = {"file": Path(paired_with).name, "sha256": file_sha256(paired_with)}
        tmp = d / (".tmp-" + OPTIMIZER_CONFIG)
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, d / OPTIMIZER_CONFIG)

    def load(self, directory: str | os.PathLike) -> None:
        """Reads the state written by `save` (the hyperparameters stay those of this object)."""
        d = Path(directory)
        try:
            meta = json.loads((d / OPTIMIZER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{d / OPTIMIZER_CONFIG}: cannot read optimizer state ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != "amlx-adamw":
            raise ValueError(f"{d / OPTIMIZER_CONFIG}: not an amlx optimizer state")
        digest = meta.get("weights_sha256")
        if digest is not None and digest != file_sha256(d / OPTIMIZER_WEIGHTS):
            raise ValueError(f"{d / OPTIMIZER_WEIGHTS}: not the moments {OPTIMIZER_CONFIG} was saved with "
                             "(a save cut short?)")
        arrays, _ = io.load_safetensors(d / OPTIMIZER_WEIGHTS)
        m = {k[2:]: a for k, a in arrays.items() if k.startswith("m.")}
        v = {k[2:]: a for k, a in arrays.items() if k.startswith("v.")}
        self.load_state_dict({"step": meta.get("step"), "m": m, "v": v})
        pair = meta.get("paired_with")
        self.paired_sha256 = pair.get("sha256") if isinstance(pair, dict) else None


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, hex (read in 1 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()
