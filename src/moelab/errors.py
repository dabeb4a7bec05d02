"""User-facing errors: the CLI prints these as one line (`moelab: error: ...`) with exit code 2."""


class MoelabError(Exception):
    """A problem with the user's input (a file, a flag, a config value), not a bug in moelab."""


class ConfigError(MoelabError, ValueError):
    """An invalid configuration: the message names the field, the bad value and what is allowed."""
