"""What every rule script shares: logging to the rule's log, threads, the tracked spec, and
turning a bad-input error (``wsiattack.errors``) into one clear line and exit 1 (no traceback)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wsiattack.errors import WsiAttackError

log = logging.getLogger("wsiattack")


def run(snakemake, main: Callable[[Any, dict[str, Any]], None]) -> None:
    """Call ``main(snakemake, spec)`` where ``spec`` is the rule's tracked ``params.spec``."""
    setup_logging(snakemake.log[0] if snakemake.log else None)
    spec = json.loads(snakemake.params.spec)
    if snakemake.threads:
        _set_torch_threads(snakemake.threads)
    try:
        main(snakemake, spec)
    except WsiAttackError as error:
        log.error("%s", error)
        sys.exit(1)


def setup_logging(log_path: str | Path | None) -> None:
    """Log to the rule's ``log:`` file and to stderr (Snakemake shows stderr on failure)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )


def _set_torch_threads(threads: int) -> None:
    if "torch" in sys.modules:  # rules that never import torch should not pay for it
        sys.modules["torch"].set_num_threads(max(1, int(threads)))
