"""Exceptions that name the culprit (file, row, key, value) so a user can fix it without a traceback."""


class TunelensError(Exception):
    """Base class for every error tunelens raises on purpose."""


class ConfigError(TunelensError):
    """A config key has a bad value. The message names the key path and the value."""


class DataError(TunelensError):
    """An input data file is unusable. The message names the file and, where known, the row."""


class ModelError(TunelensError):
    """A model source cannot be resolved or loaded, or its architecture is unsupported."""
