"""What every command line shares: bad input ends in one line, not a traceback.

Every error class of the project that describes bad input (a wrong path, a file made for another
model, an unknown concept, ...) subclasses ValueError, and a missing or existing file raises
FileNotFoundError / FileExistsError; scripts run their `main` through `run_script`, which turns
those into `error: <message>` and exit status 1. `ERASURE_TRACEBACK=1` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError)


def run_script(main: Callable[[], object]) -> None:
    """Call a script's `main()`; bad input exits with one clear line."""
    try:
        main()
    except USER_ERRORS as error:
        if os.environ.get("ERASURE_TRACEBACK") == "1":
            raise
        sys.exit(f"error: {error}")
