"""Build the wheel, install it in a clean venv with the lowest declared version of every dependency, run a smoke subset.

The declared floors (`name>=X` in pyproject.toml) are then known to be true: `make test` runs this. Usage:
    python tools/check_floors.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tarfile
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "digits_cnn"
# A few CLI tests that need no test-only dependency beyond pytest; run from outside the source tree.
SMOKE_TESTS = ["tests/test_cli.py::test_version_and_help", "tests/test_cli.py::test_quantize_writes_model_and_reports",
               "tests/test_cli.py::test_sample_model_accuracy_and_size",
               "tests/test_cli.py::test_bad_recipe_exits_2_and_writes_nothing",
               "tests/test_bitwidths.py::test_mixed_precision_end_to_end_reports_resolved_plan",  # int4 weights
               "tests/test_presets.py"]
FLOOR = re.compile(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)$")


def run(*args, **kwargs) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, **kwargs)


def requirements(wheel: Path) -> list[str]:
    """Requires-Dist of the built wheel's METADATA, without extras' requirements."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(name).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines
            if line.startswith("Requires-Dist:") and "extra ==" not in line]


def check_contents(wheel: Path, sdist: Path) -> None:
    """LICENSE, the presets and the report schemas in both; the sdist leaves tests out (they need
    sample_models/ and shared models)."""
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = archive.namelist()
    with tarfile.open(sdist) as archive:
        in_sdist = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    shipped = ["LICENSE"] + sorted(str(path.relative_to(ROOT)) for pattern in
                                   ("qtool/recipe/presets/*.yaml", "qtool/reporting/schemas/*.json")
                                   for path in ROOT.glob(pattern))
    problems = [f"{what} lacks {name}" for what, names, wanted in
                (("wheel", in_wheel, shipped), ("sdist", in_sdist, shipped))
                for name in wanted if not any(n == name or n.endswith("/licenses/" + name) for n in names)]
    problems += [f"sdist holds {name}" for name in in_sdist if name.startswith("tests/")]
    if problems:
        sys.exit("check_floors: " + "; ".join(problems))


def floors(requires: list[str]) -> list[str]:
    """`name==floor` per requirement; a requirement without a plain `>=` floor is itself an error."""
    pins = []
    for requirement in requires:
        match = FLOOR.match(requirement.replace(" ", ""))
        if not match:
            sys.exit(f"check_floors: {requirement!r} has no plain '>=' floor to test")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this folder and leave it (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="qtool-floors-"))
    try:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        venv.create(work / "venv", with_pip=True)
        python = work / "venv" / "bin" / "python"
        # sdist first, then the wheel from the sdist: the sdist is complete if the wheel built from it works
        run(python, "-m", "pip", "install", "--quiet", "build")
        run(python, "-m", "build", "--outdir", work / "dist", ROOT, stdout=subprocess.DEVNULL)
        wheel, sdist = next((work / "dist").glob("*.whl")), next((work / "dist").glob("*.tar.gz"))
        check_contents(wheel, sdist)
        pins = floors(requirements(wheel))
        (work / "floors.txt").write_text("\n".join(pins) + "\n")
        print("floors:", ", ".join(pins), flush=True)
        run(python, "-m", "pip", "install", "--quiet", "--constraint", work / "floors.txt", wheel, "pytest")
        run(python, "-m", "pip", "check")
        # cwd outside the source tree, so `import qtool` is the installed wheel's
        run(work / "venv" / "bin" / "qtool", "quantize", SAMPLE / "model.onnx", "--recipe", "int8",
            "--data", SAMPLE / "calib", "--validation-data", SAMPLE / "eval", "--output", work / "demo", cwd=work)
        run(python, "-c", "import qtool, sys; assert sys.prefix in qtool.__file__, qtool.__file__", cwd=work)
        run(work / "venv" / "bin" / "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", ROOT,
            *[ROOT / test for test in SMOKE_TESTS], cwd=work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("check_floors: the wheel works with every dependency at its declared floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
