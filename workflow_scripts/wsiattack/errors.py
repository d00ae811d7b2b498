"""Errors that mean "bad input", not "bug": rule scripts print them as one line and exit 1.

Dependency-free so that every rule environment can import it.
"""

import sys
from collections.abc import Callable


class WsiAttackError(RuntimeError):
    """Base class: the message names the culprit (key, slide, row, store) and says what to do."""


class ConfigError(WsiAttackError, ValueError):
    """The configuration is invalid."""


class SampleSheetError(WsiAttackError, ValueError):
    """The sample sheet is invalid."""


class CohortError(WsiAttackError, ValueError):
    """The cohort cannot be split, trained on or evaluated as configured (too few slides per class,
    an empty fold, a per-slide table that does not match the classes)."""


class SlideError(WsiAttackError):
    """A slide cannot be used (unreadable, no tissue, no resolution)."""


class StoreError(WsiAttackError):
    """A store is missing, of the wrong kind, or does not match the current spec."""


class AttackError(WsiAttackError):
    """An attack cannot proceed (non-finite or all-zero gradients)."""


class EncoderError(WsiAttackError):
    """An encoder cannot be built or produced non-finite embeddings."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a command-line entry point; a bad-input error becomes one line on stderr and exit 1."""
    try:
        main()
    except WsiAttackError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
