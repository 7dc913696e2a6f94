"""The amlx error hierarchy (see DESIGN.md): one base class, one subclass per cause."""

from __future__ import annotations


class AmlxError(Exception):
    """Base class of every error amlx raises on purpose."""


class ModelLoadError(AmlxError):
    """A checkpoint could not be loaded: missing or corrupt files, bad config, unsupported architecture."""


class MLXError(AmlxError):
    """MLX failed; carries MLX's own message and the name of the operation."""

    def __init__(self, op: str, message: str, hint: str | None = None):
        self.op = op
        self.mlx_message = message
        self.hint = hint  # what to do about it, when amlx knows (a missing CUDA header, say)
        super().__init__(f"{op}: {message}" + (f"\n{hint}" if hint else ""))

    def __reduce__(self):
        # made again from its own arguments: pickle and copy call the class with `args` (the one
        # formatted message), which raised TypeError, so the error could not leave a process
        # (a ProcessPoolExecutor's worker, say) nor be copied
        return type(self), (self.op, self.mlx_message, self.hint), self.__dict__


class ClosedError(AmlxError):
    """The model (or engine) was closed; also ends streams still pending at close."""


class ContextLengthError(AmlxError, ValueError):
    """The prompt (plus room to generate) does not fit the model's context."""


class ChatTemplateError(AmlxError, ValueError):
    """A chat template is missing, failed to render, raised an error, tried something
    unsafe, or went over its limits (loop iterations, output size, time)."""


class ConstraintError(AmlxError, ValueError):
    """A request's constraint (`response_format`, `regex`, `choice`, `grammar`) could not be
    followed: the grammar engine gave up on it part-way (past its lexer's or parser's limits,
    e.g. a regex with nested counted repetitions). The request fails; the others go on."""


class TensorParallelError(AmlxError):
    """A rank of a tensor-parallel model (`tensor_parallel=N`) failed, died, hung
    or could not start; the model is closed and its requests end with this error."""
