"""Error types: each names the offending key, file or value and says what to do."""

from __future__ import annotations


class NeuronAtlasError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(NeuronAtlasError):
    """A config value is invalid; the message names the key path and the allowed values."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key `{key}`: {message}")


class CorruptStoreError(NeuronAtlasError):
    """An activation store file is unreadable, truncated or inconsistent."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        super().__init__(
            f"activation store file {self.path} is corrupt or incomplete: {reason}. "
            f"Delete it and re-run the workflow (snakemake re-creates it), e.g. `rm {self.path}`."
        )


class AssetMissingError(NeuronAtlasError):
    """A packaged offline asset (model, corpus, vectors) is not installed."""


class ModelUnavailableError(NeuronAtlasError):
    """A model cannot be loaded: not cached locally and the hub is unreachable, or a bad path."""


class DatasetUnavailableError(NeuronAtlasError):
    """A dataset cannot be loaded: the hub is unreachable and it is not cached, or its repository is missing."""


class EmptyCorpusError(NeuronAtlasError):
    """A corpus or shard has no usable documents."""
