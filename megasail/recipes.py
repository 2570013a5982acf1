"""Run recipes: a YAML file holding every value of a launch script's recipe, so bash holds none.

    stages: [STAGE.yaml, ...]                      # the curriculum, in order
    models: {NAME: {config: FILE.yaml, settings: {dotted.key: value}}}   # per model size (its layout)
    settings: {dotted.key: value}                   # config keys every model runs with
    plan: {nodes: 16, gpus_per_node: 8, mfu: 0.35, gpu: H100-SXM}        # defaults of megasail.plan

`python -m megasail.recipes FILE --model NAME` prints the recipe as lines a shell script reads
(``while read -r kind value``): ``config FILE``, ``stage FILE`` per stage, ``setting key=value`` per
override (the model's settings after the shared ones), ``plan_NAME value`` per plan default.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

RECIPE_KEYS = ("stages", "models", "settings", "plan")
PLAN_KEYS = ("nodes", "gpus_per_node", "mfu", "gpu")


class RecipeError(ValueError):
    """A recipe file that does not fit the format; the message names the file and the key."""


@dataclass
class Recipe:
    """One model's run of a recipe: its config file, stage files, dotted overrides and plan defaults."""

    config: str
    stages: list[str]
    overrides: list[str]
    plan: dict = field(default_factory=dict)


def _override(key: str, value) -> str:
    """``key=value`` in OmegaConf's dotlist syntax (JSON is YAML, so lists and mappings survive)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def _mapping(raw, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path, model: str) -> Recipe:
    """The recipe in `path` for model `model`; RecipeError names the file and the bad key."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RecipeError(f"recipe file {path}: {e.strerror}") from None
    raw = _mapping(raw, f"{path}")
    unknown = sorted(set(raw) - set(RECIPE_KEYS))
    if unknown:
        raise RecipeError(f"{path}: unknown recipe keys {unknown}; a recipe has {list(RECIPE_KEYS)}")
    models = _mapping(raw.get("models"), f"{path}: models")
    if str(model) not in {str(k) for k in models}:
        raise RecipeError(f"{path}: no model '{model}' under models (it has {sorted(str(k) for k in models)})")
    entry = _mapping(next(v for k, v in models.items() if str(k) == str(model)), f"{path}: models.{model}")
    if "config" not in entry:
        raise RecipeError(f"{path}: models.{model} has no config: (the model's config file)")
    plan = _mapping(raw.get("plan"), f"{path}: plan")
    bad_plan = sorted(set(plan) - set(PLAN_KEYS))
    if bad_plan:
        raise RecipeError(f"{path}: unknown plan keys {bad_plan}; choose from {list(PLAN_KEYS)}")
    stages = raw.get("stages") or []
    if not isinstance(stages, list):
        raise RecipeError(f"{path}: stages must be a list of stage files")
    shared = _mapping(raw.get("settings"), f"{path}: settings")
    own = _mapping(entry.get("settings"), f"{path}: models.{model}.settings")
    overrides = [_override(k, v) for k, v in {**shared, **own}.items()]
    return Recipe(config=str(entry["config"]), stages=[str(s) for s in stages], overrides=overrides, plan=plan)


def shell_lines(recipe: Recipe) -> list[str]:
    """The recipe as ``kind value`` lines (see the module docstring)."""
    lines = [f"config {recipe.config}"] + [f"stage {s}" for s in recipe.stages]
    lines += [f"setting {o}" for o in recipe.overrides]
    lines += [f"plan_{k} {v}" for k, v in recipe.plan.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print a run recipe (YAML) as lines a launch script reads.")
    p.add_argument("recipe", help="recipe YAML file (e.g. examples/configs/recipes/pretrain_655b.yaml)")
    p.add_argument("--model", required=True, help="which of the recipe's models")
    args = p.parse_args(argv)
    try:
        print("\n".join(shell_lines(load_recipe(args.recipe, args.model))))
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
