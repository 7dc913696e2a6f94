"""Full-parameter fine-tuning: every floating-point weight of the model, with AdamW.

    async for ev in model.train("train.jsonl", iters=200, learning_rate=1e-5,
                                save_path="my-model"):
        ...
    model = await amlx.load("my-model")

This is mlx-lm's `--fine-tune-type full`. It shares the LoRA loop
(`amlx.train.trainer.TrainingRun`: data, batches, schedules, evaluation,
events, cancellation, generation between steps) and differs in three places:
the parameters trained (all float weights, named as in the checkpoint; no layers
are added), the options (LoRA's rank, alpha, dropout, targets, layers,
adapter_path and resume do not apply) and what is saved: `save_path` receives a
complete checkpoint directory (config.json, model.safetensors, the tokenizer
and generation files of the source checkpoint) that `amlx.load` and
transformers read. It is written every `save_every` steps and at the end, each
time replacing the previous one whole (written aside, then renamed in place; the
working directory, save_path=".", keeps its place and has its files swapped). A
save_path holding the working directory is refused before training.

Quantized models cannot be fully fine-tuned (their packed integer weights have
no gradient): train a LoRA adapter on them (QLoRA) or fine-tune a float
checkpoint. The AdamW moments are kept in memory only (two float32 copies of
every weight), so a run cannot be resumed; load the saved checkpoint and train
on instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from amlx._mlx import Array, io, memory
from amlx.checkpoint import (CONFIG, INDEX, copy_carried, holds_working_directory, read_index, replace_directory,
                             staging_directory, staging_home, weight_files)
from amlx.errors import ClosedError
from amlx.train import lora as _lora
from amlx.train.trainer import TrainingEvent, TrainingRun, TrainOptions

__all__ = ["train_full", "FullTrainingRun", "save_checkpoint", "LORA_ONLY_OPTIONS"]

# TrainOptions fields that only mean something for a LoRA adapter.
LORA_ONLY_OPTIONS = ("rank", "alpha", "dropout", "targets", "num_layers", "layers", "use_rslora", "adapter_path",
                     "resume")


def float_parameters(lm) -> dict[str, Array]:
    """Every floating-point parameter of a model, by dotted name (what a full fine-tune trains)."""
    return {k: v for k, v in lm.named_parameters() if v.dtype.is_floating}


class FullTrainingRun(TrainingRun):
    """A `TrainingRun` that trains every float weight and saves whole checkpoints."""

    def _install_parameters(self, opts: TrainOptions, resume_dir: Path | None) -> None:
        if _lora.lora_modules(self._lm):
            raise ValueError("this model carries a LoRA adapter: fuse it into a checkpoint first "
                             "(amlx.train.fuse), then fully fine-tune that checkpoint")
        # The fused q/k/v and gate/up layers and transposed views built for decoding share the
        # loaded weights; once every weight has been updated they would only keep that first copy
        # alive (nearly the model's size again). The decode step rebuilds them when it next runs.
        self._lm.release_derived()

    def _trainable(self) -> dict[str, Array]:
        return float_parameters(self._lm)

    def _teardown(self) -> None:
        # The moments (two float32 copies of every weight) are of no use once the run is over:
        # a full run cannot be resumed and its saves write weights only. Dropped here, they do
        # not outlive the run's end (or the model's close) for as long as the caller keeps the run.
        self._drop_moments()
        super()._teardown()

    _output_option = "save_path"

    def _output_dir(self) -> Path | None:
        return None if self.adapter_path is None else staging_home(self.adapter_path)

    def _save(self, checkpoint: bool) -> TrainingEvent:
        dst = self.adapter_path
        assert dst is not None  # the loop saves only when there is a save_path
        save_checkpoint(self._lm, self._model.config, self._model.info.path, dst)
        return TrainingEvent("save", self.step, self.options.iters, loss=self.losses[-1] if self.losses else None,
                             trained_tokens=self.trained_tokens, memory=memory.counters(), path=str(dst))


# -- writing the checkpoint ---------------------------------------------------------

def _outside_text_model(src: Path, prefix: str) -> dict[str, Array]:
    """Tensors of the source outside the language model (a multimodal checkpoint's
    vision tower): carried over unchanged, so the result is still a whole checkpoint."""
    if not prefix:
        return {}
    out: dict[str, Array] = {}
    for f in weight_files(src, read_index(src)):
        arrays, _ = io.load_safetensors(f)
        for name, a in arrays.items():
            if name.startswith(prefix):
                a.close()
            else:
                out[name] = a
    return out


def save_checkpoint(lm, config: dict, src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Writes `lm`'s current weights as a checkpoint directory at `dst` (worker thread).

    `config` is the model's parsed config (`load_model(...).config`), `src` the
    checkpoint it was loaded from: its config.json (with `torch_dtype` set to the
    weights' dtype) and tokenizer files are carried over. An existing `dst` is
    replaced once the new directory is complete."""
    src, dst = Path(src), Path(dst)
    prefix = config["weight_prefix"]
    tensors = {prefix + k: v for k, v in lm.named_parameters()}
    extra = _outside_text_model(src, prefix)
    raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
    first = next(iter(float_parameters(lm).values()))
    raw["torch_dtype"] = first.dtype.name
    # transformers 5 writes (and reads first) "dtype", also in a multimodal text_config: each
    # must name the weights' type too, or the config contradicts the weights
    for section in (raw, raw.get("text_config")):
        if isinstance(section, dict):
            for key in ("torch_dtype", "dtype"):
                if isinstance(section.get(key), str):
                    section[key] = first.dtype.name
    tmp = staging_directory(dst)
    try:
        io.save_safetensors(tmp / "model.safetensors", {**tensors, **extra}, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        copy_carried(src, tmp, skip=(_lora.ADAPTER_CONFIG, "optimizer.json"))
        replace_directory(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for a in extra.values():
            a.close()
    return dst


# -- the entry point ------------------------------------------------------------------

def _check_save_path(save_path, source: Path) -> Path | None:
    if save_path is None:
        return None
    if not isinstance(save_path, (str, os.PathLike)):
        raise ValueError(f"save_path must be a directory path, not {type(save_path).__name__}")
    dst = Path(save_path)
    s, d = source.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise ValueError(f"save_path {dst} must lie outside the checkpoint being trained ({source})")
    if holds_working_directory(dst):  # (each save replaces save_path whole: the working directory went with it)
        raise ValueError(f"save_path {dst} holds the working directory ({Path.cwd()}); each save replaces save_path "
                         f"whole, which would delete the working directory: name a directory of its own")
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not _is_checkpoint(dst))):
        raise ValueError(f"save_path {dst} exists and is neither empty nor a checkpoint directory "
                         f"(it would be replaced)")
    return dst


def _is_checkpoint(d: Path) -> bool:
    """Whether `d` holds a checkpoint's config and weights, as a save writes them: a config.json
    alone is no sign (a project directory often has one, and save_path="." replaced all of it)."""
    return (d / CONFIG).is_file() and ((d / "model.safetensors").is_file() or (d / INDEX).is_file())


def train_full(model, data, *, save_path: str | os.PathLike | None = None, **options) -> FullTrainingRun:
    """Fine-tunes every float weight of `model` (an `amlx.Model`); see `Model.train`.

    Options are `TrainOptions`' shared ones (iters, batch_size, learning_rate,
    lr_schedule, warmup, min_lr, weight_decay, betas, eps, grad_clip, val_data,
    steps_per_eval, val_batches, save_every, max_seq_len, truncate, seed);
    `save_path` is the checkpoint directory written (None: nothing is saved,
    the trained weights stay on the model)."""
    if model.closed:
        raise ClosedError("the model is closed")
    lora_only = sorted(set(options) & set(LORA_ONLY_OPTIONS))
    if lora_only:
        raise TypeError(f"{', '.join(lora_only)}: LoRA option(s), not used by full fine-tuning "
                        f"(use train_lora for an adapter; save_path names the checkpoint written)")
    quant = model.info.quantization
    if quant:
        raise ValueError(f"{model.info.path}: a quantized model ({quant.get('bits', '?')}-bit) cannot be fully "
                         f"fine-tuned; train a LoRA adapter on it (train_lora) or fine-tune a float checkpoint")
    dst = _check_save_path(save_path, Path(model.info.path))
    opts = TrainOptions.from_kwargs(**options, adapter_path=dst)  # the run's output directory
    return FullTrainingRun(model, data, opts)
