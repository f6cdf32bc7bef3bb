"""Errors a person can cause. The command line turns them into one line on stderr and exit status 2."""


class UserError(Exception):
    """Bad input from the user: a config key or value, a data file, a sequence too long for the model."""


class ConfigError(UserError, ValueError):
    """A config file or override names an unknown key, has a wrong type or a value outside its choices."""


class DataError(UserError):
    """A data file is missing, empty, not UTF-8 or malformed."""


class SequenceTooLongError(UserError, ValueError):
    """An input is longer than a learned position table can index."""


class InteropError(UserError, ValueError):
    """Weights cannot be mapped between this library and transformers."""
