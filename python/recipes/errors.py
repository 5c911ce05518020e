# SPDX-License-Identifier: Apache-2.0
"""User-facing errors of the recipes: printed as one clear line, exit status 2, no traceback."""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence


class RecipeError(Exception):
    """A problem with the user's input (arguments, data folder, checkpoint), not a bug."""


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a recipe's main(); RecipeError becomes 'error: ...' on stderr and exit status 2."""
    try:
        return main(argv)
    except RecipeError as exc:
        prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "recipe"
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
