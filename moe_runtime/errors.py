"""Typed errors the runtime raises for bad input. Each message names the field, the value and what is allowed."""


class MoeRuntimeError(Exception):
    """Base class: every error a user can cause derives from this, so the CLI prints one line for it."""


class ConfigError(MoeRuntimeError, ValueError):
    """A bad config value (YAML, `--set`, or a checkpoint's config.json)."""


class CheckpointError(MoeRuntimeError):
    """A checkpoint that cannot be loaded: missing, unexpected or misshapen tensors, truncated files."""


class RequestError(MoeRuntimeError, ValueError):
    """A generation request with an invalid field (sampling parameters, prompt). `field` names it (the
    message starts with it), so a transport can say where the field sits in its own request shape."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class CapacityError(RequestError):
    """A valid request this engine can never hold (prompt + completion beyond the KV cache)."""


class MissingTokenizerError(MoeRuntimeError):
    """Text in or out was asked of a checkpoint that has no tokenizer (token ids still work)."""


class UnsupportedError(MoeRuntimeError):
    """The running configuration cannot do what was asked (e.g. moving experts without the Ray executor)."""


class EngineDeadError(MoeRuntimeError, RuntimeError):
    """The engine's step loop died; every waiting request fails with this instead of hanging."""
