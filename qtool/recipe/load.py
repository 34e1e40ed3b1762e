"""Recipe files: YAML text becomes a validated Recipe, or one error naming the file, line and key.

YAML is parsed safely (no tags, no alias bombs, no duplicate keys) before the
typed models in qtool.recipe.schema check values and say what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from qtool.errors import RecipeError
from qtool.recipe.builtin import preset_names, preset_path, resolve_recipe_path
from qtool.recipe.schema import Recipe

MAX_BASE_DEPTH = 8
MAX_UPS = 2  # a path written into a recipe climbs at most this many folders, else it is absolute


def recipe_path_text(path: Path, folder: Path) -> str:
    """How a recipe in `folder` names `path` (POSIX separators): relative to the folder when the two share
    a root below `/` and the relative form climbs at most MAX_UPS folders (`../data/eval`), else absolute
    (a `../../../../work/...` that climbs to `/` breaks as soon as either moves, and says nothing)."""
    target, here = path.resolve(), folder.resolve()
    try:
        relative = Path(os.path.relpath(target, here))
    except ValueError:  # another drive (Windows)
        return target.as_posix()
    ups = sum(part == ".." for part in relative.parts)
    common = Path(os.path.commonpath([target, here]))
    if ups > MAX_UPS or common == Path(common.anchor):
        return target.as_posix()
    return relative.as_posix()


def load_recipe(path: str | Path | None) -> Recipe:
    """Read and validate a recipe file, or a preset by name (`int8`); `None` gives the default recipe."""
    if path is None:
        return Recipe()
    path = resolve_recipe_path(path)
    return parse_recipe(_read(path), path)


def parse_recipe(text: str, path: Path) -> Recipe:
    document, lines = _document(text, path)
    bases: list[Path] = []
    document = _with_base(document, path, lines, [path.resolve()], bases)
    try:
        recipe = Recipe.model_validate({**document, "source": path.resolve()})
    except ValidationError as exc:
        raise RecipeError(_describe(exc.errors()[0], path, lines)) from None
    recipe._bases = tuple(bases)
    return recipe


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if len(path.parts) == 1 and not path.suffix:
            raise RecipeError(f"{path}: no such recipe file, nor a preset ({', '.join(preset_names())})") from None
        raise RecipeError(f"{path}: cannot read recipe: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None


def _with_base(document: dict, path: Path, lines: dict, chain: list[Path], bases: list[Path]) -> dict:
    """`base: NAME` (a preset) or `base: FILE` (relative to this recipe): that recipe, with this one's keys over it.
    The files read for it (not presets) are added to `bases`."""
    if "base" not in document:
        return document
    document = dict(document)
    base = document.pop("base")
    where = f"{path}:{lines.get(('base',), 1)}: base"
    if not isinstance(base, str) or not base.strip():
        raise RecipeError(f"{where}: {base!r} is not allowed: a preset name ({', '.join(preset_names())}) "
                          "or a recipe file")
    # resolved as every path a recipe names is: `../../team.yaml` from a folder not made yet (tune's
    # recipe.tuned.yaml, checked before its output folder exists) is the file it names
    local = (path.parent / base).resolve()
    target = local if local.is_file() else preset_path(base)
    if target is None:
        raise RecipeError(f"{where}: {base!r} is neither a preset ({', '.join(preset_names())}) nor a file "
                          f"beside {path.name}")
    if target.resolve() in chain or len(chain) >= MAX_BASE_DEPTH:
        raise RecipeError(f"{where}: {base!r} leads back to a recipe already in the chain "
                          f"({' -> '.join(p.name for p in chain)})")
    if target == local:
        bases.append(local)
    parent, parent_lines = _document(_read(target), target)
    parent = _with_base(parent, target, parent_lines, [*chain, target.resolve()], bases)
    return _merged(parent, document)


def _merged(base: dict, over: dict) -> dict:
    """Mappings merged key by key, recursively; any other value of `over` replaces the base's."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (_merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else value)
    return out


def _document(text: str, path: Path) -> tuple[dict, dict]:
    """The YAML mapping and each key path's line, after the safety checks."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}{where}: not valid YAML: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{path}: YAML nested too deeply; a recipe is a few levels deep") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise RecipeError(f"{path}:1: a recipe is a mapping of sections, e.g. `version: 1`")
    _check_expansion(root, path)
    return document, _key_lines(root, (), {}, path)


MAX_YAML_NODES = 100_000


def _check_expansion(root: yaml.Node | None, path: Path) -> None:
    """Refuse aliases that refer to themselves or expand past MAX_YAML_NODES (a "billion laughs")."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise RecipeError(f"{path}:{node.start_mark.line + 1}: a YAML alias refers to itself")
        open_nodes.add(id(node))
        children = ([item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        total = 1 + sum(size(child) for child in children)
        if total > MAX_YAML_NODES:
            raise RecipeError(f"{path}:{node.start_mark.line + 1}: YAML aliases expand this document past "
                              f"{MAX_YAML_NODES:,} values; a recipe is small")
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    if root is not None:
        size(root)


def _key_lines(node: yaml.Node | None, prefix: tuple, out: dict, path: Path) -> dict:
    """Map each key path to its 1-based line; reject duplicate keys on the way."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                where = ".".join(map(str, prefix + (key,)))
                raise RecipeError(
                    f"{path}:{key_node.start_mark.line + 1}: {where}: duplicate key"
                )
            seen.add(key)
            out[prefix + (key,)] = key_node.start_mark.line + 1
            _key_lines(value_node, prefix + (key,), out, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[prefix + (index,)] = item.start_mark.line + 1
            _key_lines(item, prefix + (index,), out, path)
    return out


def _describe(error: dict, path: Path, lines: dict) -> str:
    loc = tuple(error["loc"])
    given = error.get("input")
    key_within = (error.get("ctx") or {}).get("key")  # a validator of a mapping names the entry at fault
    if key_within is not None and isinstance(given, dict):
        loc, given = loc + (key_within,), given.get(key_within)
    line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), 1)
    key = ".".join(map(str, loc)) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(_allowed_keys(loc[:-1])))
        return f"{path}:{line}: {key}: unknown key; allowed here: {allowed}"
    if kind == "missing":
        return f"{path}:{line}: {key}: required key is missing"
    if kind == "model_type":  # pydantic's 'a valid dictionary or instance of ActivationSpec': our class names
        return (f"{path}:{line}: {key}: {given!r} is not allowed: expected a mapping of its keys: "
                f"{', '.join(sorted(_allowed_keys(loc)))}")
    names = (error.get("ctx") or {}).get("expected")
    if loc[-1:] == ("[key]",) and names:  # a mapping's key outside its names (a gate's): pydantic's marker
        return f"{path}:{line}: {'.'.join(map(str, loc[:-1]))}: unknown key; allowed here: {names}"
    return f"{path}:{line}: {key}: {given!r} is not allowed: {error['msg'][0].lower()}{error['msg'][1:]}"


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):  # an item of a list section: its keys are the item model's
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
        # `Spec | None`: the section's own keys are the allowed ones.
        model = next((arg for arg in getattr(model, "__args__", ()) if hasattr(arg, "model_fields")), model)
    fields = getattr(model, "model_fields", {})
    return [name for name in fields if name != "source"]
