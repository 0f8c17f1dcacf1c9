"""Typed errors the runtime raises for bad input. Each message names the field, the value and what is allowed."""


class MoeRuntimeError(Exception):
    """Base class: every error a user can cause derives from this, so the CLI prints one line for it."""


class ConfigError(MoeRuntimeError, ValueError):
    """A bad config value (YAML, `--set`, or a checkpoint's config.json)."""


class CheckpointError(MoeRuntimeError):
    """A checkpoint that cannot be loaded: missing, unexpected or misshapen tensors, truncated files."""


class RequestError(MoeRuntimeError, ValueError):
    """A generation request with an invalid field (sampling parameters, prompt)."""


class MissingTokenizerError(MoeRuntimeError):
    """Text in or out was asked of a checkpoint that has no tokenizer (token ids still work)."""


class EngineDeadError(MoeRuntimeError, RuntimeError):
    """The engine's step loop died; every waiting request fails with this instead of hanging."""
