"""Per-rule conda envs: exact pins equal to requirements.txt, and every import a rule needs."""

import ast
import re
import sys
from pathlib import Path

import yaml
from helpers import ROOT

LIBRARY = ROOT / "workflow_scripts"
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "openslide": "openslide-python"}
# what a distribution needs beside it at run time without importing it by name
COMPANIONS = {"openslide-python": {"openslide-bin"}, "zarr": {"numcodecs"}, "tifffile": {"imagecodecs"}}


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def env_pins(path: Path) -> dict[str, str]:
    env = yaml.safe_load(path.read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return {name.lower(): version for name, version in (p.split("==") for p in pip)}


def rule_envs_and_scripts() -> list[tuple[str, Path, Path]]:
    """(rule, env file, script) for every rule, read from rules/*.smk."""
    found = []
    rule_files = sorted((ROOT / "rules").glob("*.smk"))
    assert rule_files, "no rules/*.smk found"
    for smk in rule_files:
        for block in re.split(r"\n(?=(?:rule|checkpoint) )", smk.read_text()):
            rule = re.match(r"(?:rule|checkpoint) (\w+):", block)
            env = re.search(r'conda:\s*\n\s*"([^"]+)"', block)
            script = re.search(r'script:\s*\n\s*"([^"]+)"', block)
            if rule:
                assert env and script, f"rule {rule.group(1)} in {smk.name} needs conda: and script:"
                found.append(
                    (rule.group(1), (smk.parent / env.group(1)).resolve(), (smk.parent / script.group(1)).resolve())
                )
    return found


def module_level_imports(tree: ast.Module):
    """Imports that must succeed: module level, outside ``if TYPE_CHECKING`` and outside
    ``try/except ImportError``. Imports inside functions are optional loaders (transformers,
    trident, ...) that fail with an install hint."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            todo.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):  # try: import x / except ImportError: x is optional
            optional = any("ImportError" in ast.unparse(h.type or ast.Name("")) for h in node.handlers)
            todo.extend(([] if optional else node.body) + node.orelse + node.finalbody)


def third_party_imports(script: Path) -> set[str]:
    """Top-level modules imported by a script and, transitively, by the library modules it uses."""
    seen, todo, external = set(), [script], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in module_level_imports(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top == "wsiattack":
                    module = LIBRARY / Path(*name.split("."))
                    todo.extend(p for p in (module.with_suffix(".py"), module / "__init__.py") if p.exists())
                    if isinstance(node, ast.ImportFrom):  # from wsiattack import a, b
                        todo.extend(
                            p
                            for a in node.names
                            for p in ((module / a.name).with_suffix(".py"), module / a.name / "__init__.py")
                            if p.exists()
                        )
                elif top not in sys.stdlib_module_names and top != "__future__":
                    external.add(top)
    return external


def test_env_pins_equal_requirements():
    pins = requirement_pins()
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert len(envs) >= 4  # a glob that matched nothing would pass the loop below
    for env in envs:
        assert env_pins(env), f"{env.name}: no pip pins"
        for name, version in env_pins(env).items():
            assert pins.get(name) == version, (
                f"{env.name}: {name}=={version} but requirements.txt pins {pins.get(name)}"
            )
        assert "python=3.11" in yaml.safe_load(env.read_text())["dependencies"]


def test_every_rule_env_has_what_its_script_imports():
    rules = rule_envs_and_scripts()
    assert {r for r, _, _ in rules} >= {
        "demo_cohort",
        "tile",
        "extract",
        "attack",
        "split",
        "train_mil",
        "evaluate",
        "summarize",
        "plot_metrics",
        "plot_examples",
    }
    for rule, env, script in rules:
        available = set(env_pins(env))
        needed = {DISTRIBUTIONS.get(m, m).lower() for m in third_party_imports(script)}
        needed |= {c for d in needed for c in COMPANIONS.get(d, ())}
        assert needed <= available, f"rule {rule}: {env.name} lacks {sorted(needed - available)}"
