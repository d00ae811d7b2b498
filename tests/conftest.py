"""Shared fixtures; puts the library (workflow_scripts/wsiattack) on the path."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow_scripts"))
