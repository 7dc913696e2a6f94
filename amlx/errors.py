"""The amlx error hierarchy (see DESIGN.md): one base class, one subclass per cause."""


class AmlxError(Exception):
    """Base class of every error amlx raises on purpose."""


class ModelLoadError(AmlxError):
    """A checkpoint could not be loaded: missing or corrupt files, bad config, unsupported architecture."""


class MLXError(AmlxError):
    """MLX failed; carries MLX's own message and the name of the operation."""

    def __init__(self, op: str, message: str):
        self.op = op
        self.mlx_message = message
        super().__init__(f"{op}: {message}")


class ClosedError(AmlxError):
    """The model (or engine) was closed; also ends streams still pending at close."""


class ContextLengthError(AmlxError, ValueError):
    """The prompt (plus room to generate) does not fit the model's context."""


class ChatTemplateError(AmlxError, ValueError):
    """A chat template is missing, failed to render, raised an error, tried something
    unsafe, or went over its limits (loop iterations, output size, time)."""
