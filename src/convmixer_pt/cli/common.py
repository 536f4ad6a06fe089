"""What every command line shares: a user's error is one line on stderr and a non-zero exit, never a
traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..errors import UserError, error_line


def run(body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run a CLI's body; a UserError or an operating-system error (a full disk, a path of the wrong kind) is
    printed as `error: ...` with exit status 1, Ctrl-C as `error: <interrupted>` with 130."""
    try:
        return body()
    except (UserError, OSError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
