"""Built-in presets: the recipes shipped in qtool/recipe/presets/, found by name (`--recipe int8`, `base: int8`)."""

from __future__ import annotations

from pathlib import Path

PRESETS = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS.glob("*.yaml"))


def preset_path(name: str) -> Path | None:
    """The preset file called `name` (a bare name, no folder or suffix), else None."""
    path = PRESETS / f"{name}.yaml"
    return path if name in preset_names() and path.is_file() else None


def resolve_recipe_path(path: str | Path) -> Path:
    """A path as given, unless no such file exists and it names a preset: then the preset's file."""
    path = Path(path)
    if path.exists() or len(path.parts) != 1 or path.suffix:
        return path
    return preset_path(path.name) or path


def preset_summary(name: str, width: int = 76) -> str:
    """A preset's first sentence, from its opening comment: what it is for."""
    words = []
    for line in (PRESETS / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") or not line.lstrip("# ").strip():
            break
        words.append(line.lstrip("# ").strip())
    sentence = " ".join(words).split(". ", 1)[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[:width - 1].rstrip() + "…"
