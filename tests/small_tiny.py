"""The tiny config cut down, for the slow tests whose point is the machinery (cluster, kill/resume).

Every GPU-rule job spends up to ~10 s importing torch and timm, so each slide x attack fewer saves
seconds; 4 slides is the least a stratified 2-fold split takes (2 per class).
"""

from pathlib import Path

import yaml

TINY_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def write_small_tiny_config(path: Path, *, n_slides: int, attacks: tuple[str, ...]) -> None:
    """The tiny config with ``n_slides`` demo slides and only the named attacks, written to ``path``."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["demo"]["n_slides"] = n_slides
    config["attacks"] = {name: config["attacks"][name] for name in attacks}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
