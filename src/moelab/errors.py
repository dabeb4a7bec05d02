"""User-facing errors: the CLI prints these as one line (`moelab: error: ...`) with exit code 2."""


class MoelabError(Exception):
    """A problem with the user's input (a file, a flag, a config value), not a bug in moelab."""


def require_at_least(*checks: tuple[str, float, float]) -> None:
    """Refuse a flag below its bound: each check is (flag name, value, smallest allowed value)."""
    for flag, value, low in checks:
        if value < low:
            raise MoelabError(f"{flag} {value} must be >= {low}")


class ConfigError(MoelabError, ValueError):
    """An invalid configuration: the message names the field, the bad value and what is allowed."""
