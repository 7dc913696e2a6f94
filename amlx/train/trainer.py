"""The LoRA training loop, as an async iterator of progress events.

    async for ev in model.train_lora("train.jsonl", iters=200, learning_rate=1e-4,
                                     adapter_path="adapters"):
        if ev.kind == "step":
            print(ev.step, ev.loss, ev.learning_rate, ev.tokens_per_second)

Every piece of MLX work (reading the data, adding the LoRA layers, each
training step with its evaluation and checkpoint) is one job on amlx's worker
thread (`Engine.run`), so the event loop never blocks and generation requests
on the same model interleave with the steps. Cancelling the consuming task (or
`aclose()`, or leaving an `async with`) stops the run after the step in
flight; the adapter trained so far stays on the model.

Events (`TrainingEvent.kind`):
  "eval"  validation loss (`val_loss`): before the first step, every
          `steps_per_eval` steps and after the last one, when there is
          validation data;
  "step"  one optimizer update: `loss` (mean over the learned tokens of the
          batch), `learning_rate` used, `tokens` in the batch,
          `tokens_per_second`, `trained_tokens` so far, MLX `memory`;
  "save"  an adapter checkpoint written to `path` (every `save_every` steps
          and at the end, when `adapter_path` is set);
  "done"  the run finished (`loss`: the last step's).

A step whose loss, or whose update of the weights, is NaN or infinite (a
learning rate far too high, a 16-bit overflow) is not taken: the run stops with
`NonFiniteLossError` (an `amlx.AmlxError` and a FloatingPointError) saying at
which step, and the weights stay as the step before left them.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from amlx._mlx import array, memory, ops, random
from amlx._mlx import eval as mx_eval
from amlx.checkpoint import check_creatable, read_header
from amlx.errors import AmlxError, ClosedError
from amlx.train import data as _data
from amlx.train import lora as _lora
from amlx.train.grad import causal_lm_loss, cross_entropy, trainable_parameters, value_and_grad
from amlx.train.optim import SCHEDULES, AdamW, file_sha256, make_schedule

__all__ = ["NonFiniteLossError", "TrainOptions", "TrainingEvent", "TrainingRun", "train_lora"]


class NonFiniteLossError(AmlxError, FloatingPointError):
    """A training step's loss, or the weights its update would give, is NaN or infinite
    (a learning rate too high, fp16 overflow): the run stops before taking that update."""


@dataclass
class TrainOptions:
    """Options of `Model.train_lora` (keyword arguments; ValueError on bad values)."""

    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"  # "constant" | "cosine" | "linear" (decay to min_lr at `iters`)
    warmup: int = 0  # steps of linear warm-up
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = None  # max global gradient norm
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = _lora.DEFAULT_TARGETS
    num_layers: int | None = None  # the last N layers (None: all)
    layers: tuple[int, ...] | None = None
    use_rslora: bool = False
    val_data: Any = None
    steps_per_eval: int = 200
    val_batches: int | None = 25  # None: the whole validation set
    save_every: int = 100
    adapter_path: str | os.PathLike | None = None
    max_seq_len: int = 2048
    truncate: bool = False
    seed: int = 0
    resume: bool = False  # continue from the adapter and optimizer state in adapter_path

    @classmethod
    def from_kwargs(cls, **kw) -> "TrainOptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown training option(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        opts = cls(**kw)
        opts.validate()
        return opts

    def validate(self) -> None:
        def integer(name, minimum, allow_none=False, maximum=None):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum or (maximum is not None and v > maximum):
                raise ValueError(f"{name} must be an integer >= {minimum}"
                                 f"{'' if maximum is None else f' and <= {maximum}'}"
                                 f"{' or None' if allow_none else ''}, not {v!r}")

        def number(name, minimum=0.0, allow_none=False, strict=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            try:
                ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            except OverflowError:  # an int too large for a float
                ok = False
            if not ok or v < minimum or (strict and v == minimum):
                bound = "" if minimum == -math.inf else f" {'>' if strict else '>='} {minimum}"
                raise ValueError(f"{name} must be a finite number{bound}"
                                 f"{' or None' if allow_none else ''}, not {v!r}")
            setattr(self, name, float(v))

        def flag(name):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, not {getattr(self, name)!r}")

        integer("iters", 1)
        integer("batch_size", 1)
        number("learning_rate")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, not {self.lr_schedule!r}")
        integer("warmup", 0)
        number("min_lr")
        number("weight_decay")
        number("eps")
        number("grad_clip", allow_none=True, strict=True)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), not {self.betas!r}")
        integer("rank", 1, maximum=2**31 - 1)  # a C int in MLX's calls (past it: OverflowError)
        number("alpha", minimum=-math.inf)
        number("dropout")
        if self.dropout >= 1:
            raise ValueError(f"dropout must lie in [0, 1), not {self.dropout!r}")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets must be a non-empty list of module names, not {self.targets!r}")
        integer("num_layers", 1, allow_none=True)
        integer("steps_per_eval", 1)
        integer("val_batches", 1, allow_none=True)
        integer("save_every", 1)
        integer("max_seq_len", 2)
        integer("seed", 0, maximum=2**64 - 2)  # MLX's random key is a uint64 (the dropout key is seed + 1)
        for name in ("truncate", "resume", "use_rslora"):
            flag(name)
        if self.adapter_path is not None:
            if not isinstance(self.adapter_path, (str, os.PathLike)) or isinstance(os.fspath(self.adapter_path),
                                                                                  bytes):
                raise TypeError(f"adapter_path must be a directory path (str or os.PathLike), "
                                f"not {type(self.adapter_path).__name__}")
            d = Path(self.adapter_path)
            if d.exists() and not d.is_dir():
                raise ValueError(f"adapter_path {d} exists and is not a directory")
        if self.resume and self.adapter_path is None:
            raise ValueError("resume=True needs adapter_path (the directory to resume from)")


@dataclass(frozen=True)
class TrainingEvent:
    """One progress report of a training run (see the module docstring for `kind`)."""

    kind: str
    step: int
    iters: int
    loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    tokens: int = 0
    trained_tokens: int = 0
    tokens_per_second: float = 0.0
    elapsed: float = 0.0
    memory: dict = field(default_factory=dict)
    path: str | None = None


# CausalLMs being trained right now (one run per model at a time).
_TRAINING: "weakref.WeakSet" = weakref.WeakSet()
_TRAINING_LOCK = threading.Lock()


def _loss_with_dropout(model, inputs, targets, mask, key):
    _lora.set_dropout_keys(model, key)
    try:
        return causal_lm_loss(model, inputs, targets, mask)
    finally:
        _lora.set_dropout_keys(model, None)


class TrainingRun:
    """An async iterator of `TrainingEvent`s driving one LoRA fine-tune of a Model."""

    def __init__(self, model, data, options: TrainOptions):
        self._model = model
        self._data = data
        self.options = options
        self._engine = model.engine
        self._lm = model.engine.model
        self._events: deque[TrainingEvent] = deque()
        self._finished = False
        self._stopped = False
        self.step = 0
        self.trained_tokens = 0
        self.losses: list[float] = []
        self.val_losses: list[tuple[int, float]] = []
        self._t0 = 0.0
        self._owns_guard = False
        self._setup_sent = False
        self._made_dirs: list[Path] = []  # by _check_output, deepest first

    # -- async iteration -----------------------------------------------------
    def __aiter__(self) -> "TrainingRun":
        return self

    async def __anext__(self) -> TrainingEvent:
        while not self._events:
            if self._finished or self._stopped:
                raise StopAsyncIteration
            try:
                job = self._advance if self._setup_sent else self._setup
                self._setup_sent = True
                self._events.extend(await self._engine.run(job))
            except BaseException:
                # cancelled (the job in flight still runs to its end) or failed: no further steps
                self._stop()
                raise
        return self._events.popleft()

    async def aclose(self) -> None:
        """Stops the run (after the step in flight); idempotent."""
        self._stop()

    async def __aenter__(self) -> "TrainingRun":
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop()

    def __del__(self):
        try:
            self._stop()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @property
    def adapter_path(self) -> Path | None:
        p = self.options.adapter_path
        return None if p is None else Path(p)

    @property
    def finished(self) -> bool:
        return self._finished

    async def save(self) -> Path | None:
        """Saves the adapter as trained so far to `adapter_path`, also after the run
        was stopped (a stop lets the step in flight end first: it is included).
        Returns the weights file written; None when no step has run or there is no
        adapter_path."""
        def job() -> Path | None:
            if self.adapter_path is None or self.step == 0:
                return None
            self._check_open()
            return Path(self._save(checkpoint=False).path)

        return await self._engine.run(job)

    def _stop(self) -> None:
        if self._finished or self._stopped:
            return
        self._stopped = True
        if self._setup_sent:
            # queued behind the job in flight: releases the model for another run
            self._engine.submit_job(self._teardown)

    def _teardown(self) -> None:
        if not self._owns_guard:
            return
        if not self._model.closed:
            self._engine.weights_changed()
        with _TRAINING_LOCK:
            _TRAINING.discard(self._lm)
        self._owns_guard = False

    def _drop_moments(self) -> None:
        """Worker, at the model's close (and a full run's end): the optimizer's moments can serve
        no later save or step (both need the model), so they go with it, also while the caller
        keeps the run. So does the run's random key (a run closed with its model held it, and
        MLX's active memory stayed above where it was before the load for as long as the caller
        kept the run)."""
        opt = getattr(self, "_opt", None)
        if opt is not None:
            opt.m.clear()
            opt.v.clear()
        key, self._key = getattr(self, "_key", None), None
        if key is not None:
            key.close()

    # -- worker jobs ------------------------------------------------------------
    def _check_open(self) -> None:
        if self._model.closed:
            raise ClosedError("the model was closed")

    def _setup(self) -> list[TrainingEvent]:
        """Worker: data, LoRA layers, optimizer; the first evaluation."""
        self._check_open()
        opts = self.options
        with _TRAINING_LOCK:
            if self._lm in _TRAINING:
                raise RuntimeError("this model is already being trained by another train_lora run")
            _TRAINING.add(self._lm)
        self._owns_guard = True
        self._engine.at_close(self._drop_moments)
        try:
            return self._prepare(opts)
        except BaseException:
            self._remove_made_dirs()
            self._teardown()
            raise

    def _prepare(self, opts: TrainOptions) -> list[TrainingEvent]:
        tok = self._model.tokenizer
        max_len = min(opts.max_seq_len, self._engine.max_context)
        train_src, val_src = _resolve_data(self._data, opts.val_data)
        resume_dir = self.adapter_path if opts.resume else None  # (validate(): resume has an adapter_path)
        if resume_dir is not None and not (resume_dir / _lora.ADAPTER_WEIGHTS).is_file():
            # (not a fresh start: a mistyped path would throw away the run it meant to continue)
            raise ValueError(f"resume=True: {self.adapter_path} holds no {_lora.ADAPTER_WEIGHTS} to resume from (an "
                             f"adapter saved by a training run)")
        self._check_output()
        # (where the model's context is the tighter limit, raising max_seq_len would not help)
        limit = None if max_len == opts.max_seq_len else (
            f"the model's context of {max_len} tokens (load the model with a larger max_context, shorten the "
            f"record, or pass truncate=True)")
        self.train_set = _data.load_dataset(train_src, tok, max_len, opts.truncate, limit)
        self.val_set = None if val_src is None else _data.load_dataset(val_src, tok, max_len, opts.truncate, limit)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._batches = _data.iterate_batches(self.train_set, opts.batch_size, seed=opts.seed, pad_id=pad)
        self._pad = pad
        lm = self._lm
        schedule = make_schedule(opts.lr_schedule, opts.learning_rate, opts.iters, opts.warmup, opts.min_lr)
        self._opt = AdamW(schedule, tuple(opts.betas), opts.eps, opts.weight_decay, opts.grad_clip)
        if resume_dir is not None and (resume_dir / "optimizer.json").is_file():
            self._resume_optimizer(resume_dir)  # (checked before the model's adapter is replaced)
        self._install_parameters(opts, resume_dir)
        if not self._trainable():
            raise ValueError(f"nothing to train: layers={opts.layers!r} (with num_layers={opts.num_layers!r}) "
                             f"selects no layer of this model")
        self.step = self._first_step = self._opt.step
        for _ in range(self.step):
            next(self._batches)  # a resumed run goes on with the batches it had not seen
        self._key = random.key(opts.seed + 1)
        if opts.dropout:
            # a resumed run draws the dropout masks the uninterrupted run drew at its steps:
            # the key is split once a step, as in _train_step
            for _ in range(self.step):
                self._key = random.split(self._key, 2)[0]
            mx_eval(self._key)
        self._vg = value_and_grad(lm, _loss_with_dropout if opts.dropout else causal_lm_loss)
        self._engine.weights_changed()  # the compiled decode step traced the weights without the adapter
        self._t0 = time.perf_counter()
        events = []
        if self.val_set is not None and self.step < opts.iters:
            events.append(self._eval_event())
        if self.step >= opts.iters:
            events.extend(self._finish())
        return events

    _output_option = "adapter_path"  # the option naming the output directory, for errors

    def _output_dir(self) -> Path | None:
        """The directory that must be writable before training starts: the adapter's
        (`amlx.train.full` overrides it: the directory its checkpoint is written into)."""
        return self.adapter_path

    def _remove_made_dirs(self) -> None:
        """Worker, when the setup failed: removes the directories `_check_output` made, while they are
        still empty (rmdir refuses any other); never one that existed before the run."""
        made, self._made_dirs = self._made_dirs, []
        for a in made:
            try:
                a.rmdir()
            except FileNotFoundError:
                continue
            except OSError:  # not empty (something was written there after all): kept, and its parents
                break

    def _check_output(self) -> None:
        """Worker: creates the output directory and writes a probe file in it, so that an
        unwritable `adapter_path` / `save_path` fails before training, not at the first save."""
        d = self._output_dir()
        if d is None:
            return
        where = f"{self._output_option} {self.adapter_path} cannot be written"
        try:
            check_creatable(d)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        # the directories this run makes (the output's and missing parents), deepest first: a run
        # that fails before it writes anything (bad data, nothing to train) takes them away again
        self._made_dirs = []
        for a in (d, *d.parents):
            if a.exists() or a.is_symlink():
                break
            self._made_dirs.append(a)
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError as exc:
            raise ValueError(f"{where}: {exc.strerror or exc}"
                             f"{'' if exc.filename in (None, str(self.adapter_path)) else f' ({exc.filename})'}"
                             ) from None

    def _resume_optimizer(self, d: Path) -> None:
        """Worker: loads the optimizer state saved in `d` beside its adapter. It must hold moments
        of exactly the adapter's matrices: a layer without them would restart its moments under
        the bias correction of a late step, a mis-shaped one fail inside the first step."""
        try:
            self._opt.load(d)
        except ValueError as exc:
            raise ValueError(f"{d}: cannot resume the optimizer state: {exc}") from None
        paired = self._opt.paired_sha256
        if paired is not None and paired != file_sha256(d / _lora.ADAPTER_WEIGHTS):
            raise ValueError(f"{d}: the optimizer state was saved with another {_lora.ADAPTER_WEIGHTS} than the one "
                             "there now (a save cut short between the two, or the adapter replaced?); with "
                             "optimizer.json deleted, resume trains on from this adapter as a new run (step 0, "
                             "fresh moments)")
        tensors, _ = read_header(d / _lora.ADAPTER_WEIGHTS)  # (the adapter's names and shapes)
        moments = [(k, tuple(a.shape)) for state in (self._opt.m, self._opt.v) for k, a in state.items()]
        if set(self._opt.m) != set(tensors) or any(k not in tensors or tensors[k].shape != shape
                                                   for k, shape in moments):
            raise ValueError(f"{d}: the optimizer state (optimizer.safetensors) does not match the adapter: its "
                             f"moments are not those of the adapter's matrices")

    def _install_parameters(self, opts: TrainOptions, resume_dir: Path | None) -> None:
        """Worker: makes the model ready to train (here: adds or resumes the LoRA layers).
        `amlx.train.full` overrides this, `_trainable` and `_save`."""
        lm = self._lm
        if resume_dir is not None:
            _lora.load_adapter(lm, resume_dir, self._model.config)
        elif not _lora.lora_modules(lm):
            _lora.apply_lora(lm, opts.rank, opts.alpha, opts.dropout, opts.targets, opts.num_layers, opts.layers,
                             opts.use_rslora, opts.seed)
        for m in _lora.lora_modules(lm).values():
            m.dropout = opts.dropout

    def _trainable(self) -> dict:
        """The parameters each step updates, by dotted name."""
        return trainable_parameters(self._lm)

    def _advance(self) -> list[TrainingEvent]:
        """Worker: one training step, and the evaluation / checkpoint it is due for."""
        self._check_open()
        if self._stopped:
            return []
        opts = self.options
        events = [self._train_step(next(self._batches))]
        last = self.step >= opts.iters
        if self.val_set is not None and (self.step % opts.steps_per_eval == 0 or last):
            events.append(self._eval_event())
        if self.adapter_path is not None and self.step % opts.save_every == 0 and not last:
            events.append(self._save(checkpoint=True))
        if last:
            events.extend(self._finish())
        return events

    def _train_step(self, batch: _data.Batch) -> TrainingEvent:
        lm, opt = self._lm, self._opt
        start = time.perf_counter()
        params = self._trainable()
        args = [params, array(batch.inputs), array(batch.targets), array(batch.mask)]
        if self.options.dropout:
            keys = random.split(self._key, 2)
            self._key = keys[0]
            args.append(keys[1])
        lr = opt.learning_rate
        (loss, _), grads = self._vg(*args)
        before = dict(opt.m), dict(opt.v), opt.step
        new = opt.update(params, grads)
        finite = loss * 0.0  # NaN when the loss or any updated weight is NaN or infinite
        for a in new.values():
            finite = finite + ops.sum(a * 0.0)
        mx_eval(loss, finite, *new.values(), *opt.state())
        loss_value = float(loss.item())
        if not math.isfinite(float(finite.item())):
            opt.m, opt.v, opt.step = before  # the update is dropped: the weights stay those of the last step
            if not math.isfinite(loss_value) and opt.step == self._first_step:
                raise NonFiniteLossError(
                    f"step {opt.step + 1}: the training loss is {loss_value} before this run changed any weight: the "
                    f"model{' and its adapter' if _lora.lora_modules(lm) else ''} give non-finite values on this "
                    f"batch; training stopped")
            raise NonFiniteLossError(
                f"step {opt.step + 1}: "
                + (f"the training loss is {loss_value}" if not math.isfinite(loss_value) else
                   f"the update made weights non-finite (the loss was {loss_value:.4g})")
                + "; training stopped without this update, the weights are "
                + (f"those after step {opt.step}" if opt.step else "as they were before training")
                + f". Lower the learning rate (it was {lr:.3g}) or set grad_clip")
        lm.update(new)
        del params, grads, args, before
        took = time.perf_counter() - start
        self.step = opt.step
        self.trained_tokens += batch.trained
        self.losses.append(loss_value)
        self._engine.weights_changed()  # generation between steps sees the adapter as it is now
        return TrainingEvent("step", self.step, self.options.iters, loss=loss_value, learning_rate=lr,
                             tokens=batch.tokens, trained_tokens=self.trained_tokens,
                             tokens_per_second=batch.tokens / took if took > 0 else 0.0,
                             elapsed=time.perf_counter() - self._t0, memory=memory.counters())

    def evaluate(self) -> float:
        """Worker: the token-weighted mean loss over the validation batches."""
        total = count = 0.0
        limit = self.options.val_batches
        batches = _data.iterate_batches(self.val_set, min(self.options.batch_size, len(self.val_set)),
                                        shuffle=False, loop=False, pad_id=self._pad)
        for i, batch in enumerate(batches):
            if limit is not None and i >= limit:
                break
            logits = self._lm(array(batch.inputs))
            t, c = cross_entropy(logits, array(batch.targets), array(batch.mask))
            mx_eval(t, c)
            total += float(t.item())
            count += float(c.item())
        return total / max(count, 1.0)

    def _eval_event(self) -> TrainingEvent:
        val = self.evaluate()
        self.val_losses.append((self.step, val))
        return TrainingEvent("eval", self.step, self.options.iters, val_loss=val,
                             learning_rate=self._opt.learning_rate, trained_tokens=self.trained_tokens,
                             elapsed=time.perf_counter() - self._t0, memory=memory.counters())

    def _save(self, checkpoint: bool) -> TrainingEvent:
        d = self.adapter_path
        base = {"architecture": self._model.info.architecture, "path": self._model.info.path}
        _lora.save_adapter(self._lm, d, base_model=base)
        path = d / _lora.ADAPTER_WEIGHTS
        if checkpoint:
            name = f"{self.step:07d}_{_lora.ADAPTER_WEIGHTS}"
            _lora.save_adapter(self._lm, d, weights_name=name, base_model=base)
            path = d / name
        self._opt.save(d, paired_with=d / _lora.ADAPTER_WEIGHTS)
        return TrainingEvent("save", self.step, self.options.iters, loss=self.losses[-1] if self.losses else None,
                             trained_tokens=self.trained_tokens, elapsed=time.perf_counter() - self._t0,
                             memory=memory.counters(), path=str(path))

    def _finish(self) -> list[TrainingEvent]:
        events = []
        if self.adapter_path is not None:
            events.append(self._save(checkpoint=False))
        self._finished = True
        self._teardown()
        events.append(TrainingEvent("done", self.step, self.options.iters,
                                    loss=self.losses[-1] if self.losses else None,
                                    val_loss=self.val_losses[-1][1] if self.val_losses else None,
                                    trained_tokens=self.trained_tokens, elapsed=time.perf_counter() - self._t0,
                                    memory=memory.counters(),
                                    path=None if self.adapter_path is None else str(self.adapter_path)))
        return events


def _resolve_data(data, val_data):
    """(train source, validation source or None). A directory means its train.jsonl
    (and valid.jsonl, when val_data is not given and the file exists)."""
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        d = Path(data)
        train = d / "train.jsonl"
        if not train.is_file():
            raise _data.DataError(f"{d}: a data directory needs a train.jsonl")
        if val_data is None and (d / "valid.jsonl").is_file():
            val_data = d / "valid.jsonl"
        return train, val_data
    return data, val_data


def train_lora(model, data, **options) -> TrainingRun:
    """Fine-tunes a LoRA adapter on `model` (an `amlx.Model`); see `Model.train_lora`.

    `data`: a JSONL file, a directory with train.jsonl (and valid.jsonl), or a list
    of record dicts. Options are validated at once (ValueError / TypeError); the
    data is read, and its errors (`DataError`, naming the line) raised, when
    iteration starts."""
    if model.closed:
        raise ClosedError("the model is closed")
    opts = TrainOptions.from_kwargs(**options)
    if opts.adapter_path is not None and Path(opts.adapter_path).resolve() == Path(model.info.path).resolve():
        # its adapter_config.json would make the checkpoint read as a PEFT adapter (transformers
        # then refuses to load it as a model)
        raise ValueError(f"adapter_path {opts.adapter_path} is the checkpoint directory being trained; give the "
                         f"adapter a directory of its own (a subdirectory will do)")
    return TrainingRun(model, data, opts)
