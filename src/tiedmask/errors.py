"""User-facing errors: the CLI prints them as one `error:` line, never a traceback."""


class TiedmaskError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(TiedmaskError):
    """An unknown key, an ill-typed value or a value out of range in a config."""


class DataError(TiedmaskError):
    """A missing, incomplete or corrupt dataset."""
