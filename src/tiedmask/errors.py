"""User-facing errors: the CLI and the benchmark scripts print them as one `error:` line, exit
code 2, never a traceback."""

import argparse
import sys
from typing import Callable, NoReturn


class TiedmaskError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(TiedmaskError):
    """An unknown key, an ill-typed value or a value out of range in a config."""


class DataError(TiedmaskError):
    """A missing, incomplete or corrupt dataset."""


def error_line(exc: BaseException) -> str:
    """The one line a user sees for `exc`: its message with line breaks folded."""
    return "error: " + " ".join(str(exc).split())


def run_script(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's `main` (benchmarks/*.py) the way the CLI runs a command: a TiedmaskError
    becomes one `error:` line and exit code 2, Ctrl-C one line and 130."""
    try:
        code = main()
    except TiedmaskError as exc:
        print(error_line(exc), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage mistakes as one `error:` line naming the fix, exit code 2 (not
    argparse's usage block); subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)
