"""`qtool init`: a starter recipe that loads, runs, and says what the user must check."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, save
from PIL import Image

from conftest import ROOT, SAMPLE, make_model, shared_model
from qtool import api
from qtool.cli.main import main
from qtool.recipe.load import load_recipe
from qtool.recipe.schema import recipe_json_schema


def init(*args: str):
    return CliRunner().invoke(main, ["init", *args])


def test_array_data_recipe_loads_and_quantize_runs_it_unchanged(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    result = init(str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "calib"),
                  "--validation-data", str(SAMPLE / "eval"), "--output", str(recipe))
    assert result.exit_code == 0, result.output
    # the timing takes a while on a large model (u2netp: 100 s on a loaded machine, silent before): said first
    assert result.stderr.startswith("timing: 0/1 samples\n") and "timing: 1/1 samples" in result.stderr
    text = recipe.read_text()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=qtool-recipe.schema.json"
    assert json.loads((tmp_path / "qtool-recipe.schema.json").read_text()) == recipe_json_schema()
    assert "#   image: float32 [N, 1, 16, 16]" in text  # inputs detected from the model
    loaded = load_recipe(recipe)
    assert loaded.data.images is None
    # eval has 300 labels; a model slower than float fails, as with the shipped presets
    assert loaded.validation.gates == {"min_cosine": 0.9, "max_accuracy_drop": 0.01, "max_latency_ratio": 1.0}
    assert loaded.validation.data and (recipe.parent / loaded.validation.data).resolve() == (SAMPLE / "eval")
    outcome = api.quantize(SAMPLE / "model.onnx", SAMPLE / "calib", recipe, tmp_path / "out")
    assert outcome.passed and (tmp_path / "out" / "report.json").is_file()


def test_refuses_to_overwrite(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("mine\n")
    result = init(str(SAMPLE / "model.onnx"), "--output", str(recipe))
    assert result.exit_code == 2 and "pass --overwrite" in result.output
    assert recipe.read_text() == "mine\n"
    assert init(str(SAMPLE / "model.onnx"), "--output", str(recipe), "--overwrite").exit_code == 0
    assert load_recipe(recipe).version == 1


def test_foreign_schema_file_is_not_replaced_and_schema_url_is_used(tmp_path):
    (tmp_path / "qtool-recipe.schema.json").write_text("{}")
    result = init(str(SAMPLE / "model.onnx"), "--output", str(tmp_path / "r.yaml"))
    assert result.exit_code == 2 and "not a qtool recipe schema" in result.output
    url = "https://example.org/qtool-recipe.schema.json"
    assert init(str(SAMPLE / "model.onnx"), "--output", str(tmp_path / "r.yaml"), "--schema", url).exit_code == 0
    assert (tmp_path / "r.yaml").read_text().startswith(f"# yaml-language-server: $schema={url}\n")
    assert (tmp_path / "qtool-recipe.schema.json").read_text() == "{}"


def dynamic_image_model(folder):
    """A one-Relu model over [N, 3, H, W] images with H and W left open."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    save(model, str(folder / "m.onnx"))
    return folder / "m.onnx"


def test_image_defaults_are_marked_check(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    Image.fromarray(np.zeros((100, 150, 3), np.uint8)).save(data / "a.png")
    dynamic_image_model(tmp_path)
    result = init(str(tmp_path / "m.onnx"), "--data", str(data), "--output", str(tmp_path / "r.yaml"))
    assert result.exit_code == 0 and "CHECK" in result.output
    images = load_recipe(tmp_path / "r.yaml").data.images
    assert images.size == (96, 160)  # 100x150 rounded to multiples of 32
    assert (images.channels, images.scale, images.mean, images.std) == ("RGB", 255, [0.0], [1.0])
    text = (tmp_path / "r.yaml").read_text()
    assert text.count("# CHECK:") == 3  # size, channel order, mean/std


def test_colour_images_for_a_one_channel_model_become_grey_and_quantize_runs(tmp_path):
    """New-user finding: `init` on the sample (1-channel) model with a folder of colour images wrote
    channels: RGB, and quantize then refused every image ([1, 3, 16, 16] does not fit [N, 1, 16, 16])."""
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / f"{i}.png")
    recipe = tmp_path / "r.yaml"
    result = init(str(SAMPLE / "model.onnx"), "--data", str(data), "--output", str(recipe))
    assert result.exit_code == 0, result.output
    images = load_recipe(recipe).data.images
    assert images.channels == "GRAY" and images.size == (16, 16)
    from qtool.io.images import preprocess_image
    sample = preprocess_image(data / "0.png", images, images.size)
    expected = np.asarray(Image.open(data / "0.png").convert("L").resize((16, 16), Image.Resampling.BILINEAR))
    assert sample.shape == (1, 16, 16) and np.abs(sample[0] * 255 - expected).max() <= 1.5
    outcome = api.quantize(SAMPLE / "model.onnx", data, recipe, tmp_path / "out")
    assert (tmp_path / "out" / "model.onnx").is_file() and outcome.report["calibration"]
    (tmp_path / "bad.yaml").write_text("data:\n  images: {channels: GRAY, mean: [0.5, 0.5, 0.5]}\n")
    with pytest.raises(Exception, match="expected 1 value with channels: GRAY"):
        load_recipe(tmp_path / "bad.yaml")


@pytest.mark.parametrize("args, message", [
    (["--mean", "0.1,0.2"], "expected 1 or 3 values"),
    (["--size", "320"], "expected HxW"),
    (["--data", "/no/such/folder"], "no such data folder"),
    (["--std", "0"], "Error: --std 0: 0 is not allowed: input should be greater than 0"),
    (["--std", "1,-1,1"], "Error: --std 1,-1,1: -1 is not allowed"),
    (["--mean", "nan"], "Error: --mean nan: nan is not allowed: input should be a finite number"),
    (["--scale", "inf"], "Error: --scale inf: inf is not allowed"),
])
def test_bad_options_exit_2(tmp_path, args, message):
    result = init(str(SAMPLE / "model.onnx"), "--output", str(tmp_path / "r.yaml"), *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "r.yaml").exists()


def test_a_bad_preprocessing_option_is_named_not_the_recipe_never_written(tmp_path):
    """New-user finding 13: `--std 0` with image data blamed `r.yaml:35: data.images.std.0`, a file never written."""
    data = tmp_path / "imgs"
    data.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "a.png")
    dynamic_image_model(tmp_path)
    result = init(str(tmp_path / "m.onnx"), "--data", str(data), "--output", str(tmp_path / "r.yaml"),
                  "--std", "0")
    assert result.exit_code == 2 and result.stderr.startswith("Error: --std 0: 0 is not allowed")
    assert "r.yaml" not in result.stderr and not (tmp_path / "r.yaml").exists()


def test_ppocr_det_recipe_matches_manifest_and_quantize_runs_it(tmp_path):
    """Issue 8's bar: plain `qtool init` on ppocr_det gives MANIFEST.md's preprocessing, and the recipe runs."""
    folder = shared_model("ppocr_det")
    recipe = tmp_path / "recipe.yaml"
    result = init(str(folder / "model.onnx"), "--data", str(folder / "calib"), "--output", str(recipe))
    assert result.exit_code == 0, result.output
    images = load_recipe(recipe).data.images
    # MANIFEST.md: BGR, x/255, mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225], NCHW, 320x320.
    assert (images.channels, images.scale, images.layout, images.size, images.resize, images.crop) == \
        ("BGR", 255, "NCHW", (320, 320), None, "none")
    assert (images.mean, images.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert images == load_recipe(ROOT / "qtool" / "recipe" / "presets" / "ppocr_det.yaml").data.images
    text = recipe.read_text()
    assert "PaddleOCR text detector" in text
    assert text.count("# CHECK:") == 1  # only the size: the model's H and W are dynamic
    # The recipe as written runs (on two of the images, to keep the test short).
    calib = tmp_path / "calib"
    calib.mkdir()
    for path in sorted((folder / "calib").glob("*.jpg"))[:2]:
        shutil.copy(path, calib)
    outcome = api.quantize(folder / "model.onnx", calib, recipe, tmp_path / "out")
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert outcome.report["gates"][0]["name"] == "min_cosine"
    # a first run passes its starter gate (it failed at cosine 0.927 against 0.99 before)
    assert outcome.passed and 0.9 <= outcome.report["gates"][0]["value"] < 0.99, outcome.report["gates"]


def test_ppocr_cls_follows_its_family_and_options_still_win(tmp_path):
    folder = shared_model("ppocr_cls")
    recipe = tmp_path / "recipe.yaml"
    result = init(str(folder / "model.onnx"), "--data", str(folder / "calib"), "--channels", "RGB",
                  "--output", str(recipe))
    assert result.exit_code == 0 and "CHECK" not in result.output
    images = load_recipe(recipe).data.images
    # MANIFEST.md: 48x192, x/255, mean 0.5, std 0.5 (RGB or BGR give the same accuracy; the option wins).
    assert (images.channels, images.size, images.scale, images.mean, images.std) == \
        ("RGB", (48, 192), 255, [0.5], [0.5])


def test_mixed_image_sizes_give_a_square_of_the_median_shorter_side(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    for index, (height, width) in enumerate([(200, 500), (330, 300), (700, 400)]):
        Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(data / f"{index}.png")
    result = init(str(dynamic_image_model(tmp_path)), "--data", str(data), "--output", str(tmp_path / "r.yaml"))
    assert result.exit_code == 0
    text = (tmp_path / "r.yaml").read_text()
    assert load_recipe(tmp_path / "r.yaml").data.images.size == (288, 288)  # shorter sides 200, 300, 400
    assert "PaddleOCR" not in text and text.count("# CHECK:") == 3  # no known family: size, channels, mean/std


@pytest.mark.parametrize("labelled, drop", [(300, 0.01), (96, 0.021), (50, 0.04)])
def test_starter_accuracy_gate_is_at_least_two_samples(tmp_path, labelled, drop):
    """With 96 labels one sample is 1.04 points: a 0.01 gate would fail on one sample's noise."""
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "labels.txt").write_text("".join(f"{i:04d}.npy {i % 10}\n" for i in range(labelled)))
    recipe = tmp_path / "recipe.yaml"
    result = init(str(SAMPLE / "model.onnx"), "--validation-data", str(evaluation), "--output", str(recipe))
    assert result.exit_code == 0, result.output
    assert load_recipe(recipe).validation.gates == {"min_cosine": 0.9, "max_accuracy_drop": drop,
                                                    "max_latency_ratio": 1.0}
    assert f"2 of the {labelled} labelled samples" in recipe.read_text()


def test_the_labels_hint_uncommented_names_the_labels_file(tmp_path):
    """New-user finding 14: `# labels: labels.txt` uncommented resolved against the recipe's folder."""
    evaluation = tmp_path / "data" / "eval"
    evaluation.mkdir(parents=True)
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "r.yaml"
    assert init(str(SAMPLE / "model.onnx"), "--validation-data", str(evaluation), "--output", str(recipe)).exit_code == 0
    (evaluation / "labels.txt").write_text("0000.npy 1\n")
    text = recipe.read_text()
    assert "  # labels: ../data/eval/labels.txt" in text.splitlines()
    recipe.write_text(text.replace("  # labels: ", "  labels: "))
    loaded = load_recipe(recipe)
    assert loaded.resolve_path(loaded.validation.labels) == evaluation / "labels.txt"


def test_schema_output_never_replaces_a_file_unasked(tmp_path):
    """`qtool schema --output` replaced any existing file (a model, say) with exit 0."""
    target = tmp_path / "model.onnx"
    target.write_bytes(b"not a schema")
    runner = CliRunner()
    result = runner.invoke(main, ["schema", "--output", str(target)])
    assert result.exit_code == 2 and f"{target}: file exists; pass --overwrite to replace it" in result.stderr
    assert target.read_bytes() == b"not a schema"
    assert runner.invoke(main, ["schema", "--output", str(target), "--overwrite"]).exit_code == 0
    assert json.loads(target.read_text()) == recipe_json_schema()


def test_schema_prints_the_shipped_report_schemas_that_real_reports_validate_against(tmp_path):
    """The report schemas ship in the package (a wheel has no docs/): `qtool schema report` prints the
    schema a real quantize report.json validates against; an unknown kind is exit 2 naming the choices."""
    import jsonschema

    runner = CliRunner()
    printed = {}
    for kind in ("report", "tune-report"):
        result = runner.invoke(main, ["schema", kind])
        assert result.exit_code == 0, result.output
        printed[kind] = json.loads(result.stdout)
        jsonschema.Draft202012Validator.check_schema(printed[kind])
    assert printed["report"] != printed["tune-report"]
    out = tmp_path / "out"
    result = runner.invoke(main, ["quantize", str(SAMPLE / "model.onnx"), "--recipe", "int8", "--no-bench",
                                  "--data", str(SAMPLE / "calib"), "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads((out / "report.json").read_text()), printed["report"])
    result = runner.invoke(main, ["schema", "reports"])
    assert result.exit_code == 2 and "'recipe', 'report', 'tune-report'" in result.stderr


def test_data_paths_are_relative_only_when_short_and_under_a_common_root(tmp_path):
    """A recipe in /tmp naming data in the checkout got `../../../../../work/.../eval` (climbing to /);
    now that is absolute, and data beside the recipe's folder stays relative (`../data/eval`)."""
    from qtool.recipe.load import recipe_path_text

    far = tmp_path / "far" / "recipe.yaml"
    assert init(str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "calib"), "--validation-data",
                str(SAMPLE / "eval"), "--output", str(far)).exit_code == 0
    line = next(line for line in far.read_text().splitlines() if line.startswith("  data:"))
    assert line.split()[1] == (SAMPLE / "eval").resolve().as_posix() and "absolute" in line
    assert f"--data {(SAMPLE / 'calib').resolve().as_posix()} " in far.read_text()
    project = tmp_path / "project"
    for part in ("calib", "eval"):
        (project / "data" / part).mkdir(parents=True)
        for source in sorted((SAMPLE / part).glob("*.npy"))[:4]:
            shutil.copy(source, project / "data" / part)
    near = project / "recipes" / "recipe.yaml"
    assert init(str(SAMPLE / "model.onnx"), "--data", str(project / "data" / "calib"), "--validation-data",
                str(project / "data" / "eval"), "--output", str(near)).exit_code == 0
    assert load_recipe(near).validation.data == "../data/eval"
    assert "  data: ../data/eval   # relative to this file" in near.read_text()
    assert recipe_path_text(tmp_path / "a" / "b", tmp_path / "c" / "d" / "e") == (tmp_path / "a" / "b").as_posix()
    assert recipe_path_text(tmp_path / "a" / "b", tmp_path / "c" / "d") == "../../a/b"


def test_json_carries_the_measured_latency_and_the_warnings_stderr_prints(tmp_path):
    """New-user finding: `init --json` printed only the two paths; a script reading it missed what init
    measured and warned (the latency gate likely to fail, placement fast refusing)."""
    ran = init(str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "calib"), "--output", str(tmp_path / "r.yaml"),
               "--json")
    assert ran.exit_code == 0, ran.output
    document = json.loads(ran.stdout)
    assert set(document) == {"recipe", "schema", "latency_ratio", "warnings"}
    assert document["latency_ratio"] > 0
    assert [f"warning: {line}" for line in document["warnings"]] == ran.stderr.splitlines()


def test_init_says_when_placement_fast_keeps_every_node_float_so_quantize_refuses(tmp_path):
    """New-user finding: on ppocr_cls, init timed the fused int8 model (1.36x float) and said only that the
    latency gate would likely fail, while `qtool quantize` with the starter refused (exit 2: `placement:
    fast`, the default, keeps all 164 nodes float on the sample's shapes). init now previews fast on its
    first sample as quantize places it and says quantize refuses; the timing is of placement fused."""
    from qtool.errors import ModelError

    folder = shared_model("ppocr_cls")
    result = api.init_recipe(folder / "model.onnx", tmp_path / "recipe.yaml", data_dir=folder / "calib")
    said = "`qtool quantize` with it refuses (exit 2: no 8-bit kernel pays)"
    assert len(result.warnings) == 1 and said in result.warnings[0]
    assert f"`quantization.placement: fused` its int8 model ran at {result.latency_ratio:.2f}x" in result.warnings[0]
    comments = " ".join(line.strip().lstrip("# ") for line in result.recipe.read_text().splitlines())
    assert said in comments
    recipe = load_recipe(result.recipe)
    recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update={"samples": 2})})
    with pytest.raises(ModelError, match="no 8-bit kernel pays"):
        api.quantize(folder / "model.onnx", folder / "calib", recipe)


def test_init_times_the_starter_and_says_when_its_latency_gate_will_fail_here(tmp_path):
    """ppocr_cls and pyannote_seg3 failed their own init recipe's max_latency_ratio 1.0 without a word
    at init (int8 slower than float there). init now times the starter's int8 model (placed as quantize
    places it) against float on the first calibration sample; above 0.9x float the recipe's comments and
    stderr say the gate will likely fail here. The gate stays: a model slower than float is no model to
    ship. Which side a run lands on is this machine's: the test checks that ratio and warning agree."""
    from qtool.authoring.starter import LATENCY_MARGIN, MeasuredLatency, starter_recipe
    from qtool.io.model import load_model

    folder = shared_model("ppocr_cls")
    result = api.init_recipe(folder / "model.onnx", tmp_path / "recipe.yaml", data_dir=folder / "calib")
    assert load_recipe(result.recipe).validation.gates["max_latency_ratio"] == 1.0
    assert result.latency_ratio is not None and result.latency_ratio > 0
    slow = result.latency_ratio > LATENCY_MARGIN
    assert bool(result.warnings) is slow
    assert (f"{result.latency_ratio:.2f}x float's latency" in result.recipe.read_text()) is slow
    text = starter_recipe(load_model(folder / "model.onnx"), folder / "model.onnx", tmp_path / "r.yaml",
                          folder / "calib", slow=MeasuredLatency(1.5, 1.0, 1.5, 60))
    assert "gates: {min_cosine: 0.9, max_latency_ratio: 1.0}" in text
    assert "# Measured by `qtool init`: the starter recipe's int8 model ran at 1.50x float's latency here" in text
    ran = init(str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "calib"), "--output", str(tmp_path / "d.yaml"))
    assert ran.exit_code == 0 and load_recipe(tmp_path / "d.yaml").validation.gates["max_latency_ratio"] == 1.0
    assert ("warning: the starter recipe's int8 model ran at" in ran.stderr) is (
        "Measured by `qtool init`" in (tmp_path / "d.yaml").read_text())


def test_a_size_the_detector_cannot_take_is_refused_naming_the_sizes_it_can(tmp_path):
    """PaddleOCR's detector needs H and W in multiples of 32: --size 300x300 wrote a recipe whose quantize
    then failed with ONNX Runtime's `Attempting to broadcast an axis by a dimension other than 1. 19 by 20`."""
    folder = shared_model("ppocr_det")
    result = init(str(folder / "model.onnx"), "--data", str(folder / "calib"), "--size", "300x300",
                  "--output", str(tmp_path / "r.yaml"))
    assert result.exit_code == 2 and not (tmp_path / "r.yaml").exists()
    assert ("--size 300x300: the model is a PaddleOCR text detector (DB), whose height and width must be "
            "multiples of 32") in result.stderr
    assert "e.g. --size 288x288 or --size 320x320" in result.stderr


def test_init_says_why_its_latency_probe_failed(tmp_path):
    """A model ONNX Runtime cannot run on the data's first sample (a constant [1, 3, 8, 8] added to 10x10
    inputs): init still writes the recipe, and says on stderr that it could not time it, with ORT's reason."""
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="/conv"),
                        helper.make_node("Add", ["c", "k"], ["y"], name="/add")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H2", "W2"])],
                       {"w": np.ones((3, 3, 1, 1), np.float32), "k": np.ones((1, 3, 8, 8), np.float32)})
    save(model, tmp_path / "model.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "0000.npy", np.ones((1, 3, 10, 10), np.float32))
    result = init(str(tmp_path / "model.onnx"), "--data", str(tmp_path / "calib"), "--output",
                  str(tmp_path / "r.yaml"))
    assert result.exit_code == 0 and (tmp_path / "r.yaml").is_file()
    assert "warning: could not time the recipe's int8 model against float on the first sample of" in result.stderr
    assert "ONNX Runtime:" in result.stderr and "broadcast" in result.stderr.lower()
