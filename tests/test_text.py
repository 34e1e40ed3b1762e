"""Text files as calibration and validation data: tokenized with a tokenizer.json built here with the
`tokenizers` library itself, cut and padded to max_length, mapped onto the model's inputs by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qtool
from qtool.errors import DataError, RecipeError, UsageError
from qtool.io.feeds import open_data
from qtool.io.samples import model_inputs
from qtool.recipe.load import parse_recipe
from qtool.runtime.session import make_session, run

tokenizers = pytest.importorskip("tokenizers")

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
WORDS = "the a cat dog sat ran on under mat log quickly slowly big small red blue".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
DIM = 12


def _tokenizer(path: Path, vocabulary: list[str], by_character: bool = False) -> Path:
    vocab = {token: index for index, token in enumerate(SPECIAL + vocabulary)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = (tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), "isolated") if by_character
                               else tokenizers.pre_tokenizers.Whitespace())
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(path))
    return path


def _encoder(path: Path, length) -> Path:
    """Embeddings of ids and type ids, masked, through one MatMul + Tanh: a tiny encoder's shape."""
    rng = np.random.default_rng(0)
    weights = {"E": rng.normal(0, 1, (len(SPECIAL) + len(WORDS), DIM)), "T": rng.normal(0, 0.2, (2, DIM)),
               "W": rng.normal(0, 0.4, (DIM, DIM))}
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
             helper.make_node("Gather", ["T", "token_type_ids"], ["typ"]),
             helper.make_node("Add", ["emb", "typ"], ["sum"]),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
             helper.make_node("Mul", ["sum", "mask3"], ["masked"]),
             helper.make_node("MatMul", ["masked", "W"], ["mm"], name="proj"),
             helper.make_node("Tanh", ["mm"], ["hidden"])]
    ints = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", length])
            for name in ("input_ids", "attention_mask", "token_type_ids")]
    graph = helper.make_graph(
        nodes, "encoder", ints, [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", length, DIM])],
        [*(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()),
         numpy_helper.from_array(np.array([-1], np.int64), "last")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _tagger(path: Path, length: int, classes: int = 5) -> Path:
    """A tag per position: ArgMax over logits = masked embeddings x W + B. B is small per-position noise,
    so a padded position (embeddings masked to 0) has near-tied logits, whose order int8 loses."""
    rng = np.random.default_rng(3)
    weights = {"E": rng.normal(0, 1, (len(SPECIAL) + len(WORDS), DIM)), "W": rng.normal(0, 0.6, (DIM, classes)),
               "B": rng.normal(0, 1e-3, (length, classes))}
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
             helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
             helper.make_node("MatMul", ["masked", "W"], ["mm"], name="proj"),
             helper.make_node("Add", ["mm", "B"], ["logits"], name="bias"),
             helper.make_node("ArgMax", ["logits"], ["tags"], axis=-1, keepdims=0)]
    ints = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", length])
            for name in ("input_ids", "attention_mask")]
    graph = helper.make_graph(
        nodes, "tagger", ints, [helper.make_tensor_value_info("tags", TensorProto.INT64, ["batch", length])],
        [*(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()),
         numpy_helper.from_array(np.array([-1], np.int64), "last")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _sentences(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(count)]


def _recipe(folder: Path, text: str) -> Path:
    path = folder / "text.yaml"
    path.write_text("version: 1\nquantization: {placement: fused}\ndata:\n  text:\n    tokenizer: tokenizer.json\n" + text)
    return path


def test_lines_become_padded_ids_masks_and_type_ids(tmp_path):
    _tokenizer(tmp_path / "tokenizer.json", WORDS)
    model = onnx.load(_encoder(tmp_path / "enc.onnx", "seq"))
    (tmp_path / "calib.txt").write_text("the cat sat\n\nthe dog ran on the mat quickly\n")
    recipe = parse_recipe(_recipe(tmp_path, "    max_length: 6\n").read_text(), tmp_path / "text.yaml")
    samples = list(open_data(tmp_path / "calib.txt", model_inputs(model), None, recipe).samples())
    assert [name for name, _ in samples] == ["calib.txt:1", "calib.txt:3"]  # blank lines skipped
    first, second = samples[0][1], samples[1][1]
    ids = {word: index + len(SPECIAL) for index, word in enumerate(WORDS)}
    assert first["input_ids"].tolist() == [[2, ids["the"], ids["cat"], ids["sat"], 3, 0]]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0]]
    assert first["token_type_ids"].tolist() == [[0] * 6] and first["input_ids"].dtype == np.int64
    assert second["input_ids"].shape == (1, 6) and second["attention_mask"].all()  # truncated to 6


def test_jsonl_field_and_unpadded_samples(tmp_path):
    _tokenizer(tmp_path / "tokenizer.json", WORDS)
    model = onnx.load(_encoder(tmp_path / "enc.onnx", "seq"))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"sentence": "a big red dog"}) + "\n"
                                    + json.dumps({"sentence": "the cat"}) + "\n")
    (folder / "labels.txt").write_text("a.jsonl:1 0\n")  # a labels file is not text data
    recipe = parse_recipe(_recipe(tmp_path, "    field: sentence\n    padding: none\n").read_text(),
                          tmp_path / "text.yaml")
    source = open_data(folder, model_inputs(model), None, recipe)
    assert [feeds["input_ids"].shape for _, feeds in source.samples()] == [(1, 6), (1, 4)]
    assert [batch.count for batch in source.batches(8)] == [1, 1]  # each length its own run


def test_encoder_quantized_from_a_text_file(tmp_path):
    _tokenizer(tmp_path / "tokenizer.json", WORDS)
    model_path = _encoder(tmp_path / "enc.onnx", "seq")
    (tmp_path / "calib.txt").write_text("\n".join(_sentences(1, 24)) + "\n")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(2, 16)))
    recipe = _recipe(tmp_path, "    max_length: 16\nvalidation:\n  gates: {min_cosine: 0.99}\n")
    result = qtool.quantize(model_path, tmp_path / "calib.txt", recipe, validation_data=tmp_path / "eval.jsonl")
    assert result.report["validation"]["samples"] == 16
    assert result.report["validation"]["outputs"]["hidden"]["cosine"] >= 0.99
    assert result.passed


def test_text_errors_name_the_key(tmp_path):
    _tokenizer(tmp_path / "tokenizer.json", WORDS)
    fixed = model_inputs(onnx.load(_encoder(tmp_path / "fixed.onnx", 8)))
    (tmp_path / "calib.txt").write_text("the cat\n")
    recipe = parse_recipe(_recipe(tmp_path, "    max_length: 6\n").read_text(), tmp_path / "text.yaml")
    with pytest.raises(RecipeError, match=r"data\.text\.max_length 6: the model fixes its sequence length at 8"):
        open_data(tmp_path / "calib.txt", fixed, None, recipe)
    default = parse_recipe(_recipe(tmp_path, "").read_text(), tmp_path / "text.yaml")
    (name, feeds), = open_data(tmp_path / "calib.txt", fixed, None, default).samples()
    assert feeds["input_ids"].shape == (1, 8)  # max_length from the model
    renamed = [spec.__class__(f"in{index}", spec.dtype, spec.shape) for index, spec in enumerate(fixed)]
    with pytest.raises(RecipeError, match=r"no tokenizer output for model input 'in0'; map each input in "
                                          r"data\.text\.inputs"):
        open_data(tmp_path / "calib.txt", renamed, None, default)
    missing = parse_recipe("version: 1\nquantization: {placement: fused}\ndata:\n  text: {tokenizer: nowhere.json}\n", tmp_path / "r.yaml")
    with pytest.raises(RecipeError, match=r"data\.text\.tokenizer: no such file .*nowhere\.json"):
        open_data(tmp_path / "calib.txt", fixed, None, missing)
    with pytest.raises(DataError, match=r"holds text .* the recipe needs a data\.text section"):
        open_data(tmp_path / "calib.txt", fixed, None, None)
    (tmp_path / "bad.jsonl").write_text('{"other": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: no text under key 'text'"):
        open_data(tmp_path / "bad.jsonl", fixed, None, default)


@pytest.mark.skipif(not (SHARED_MODELS / "albert_ja_pos" / "model.onnx").is_file(),
                    reason="shared/models is not beside the repository")
def test_albert_ja_pos_fed_from_text_through_a_character_tokenizer(tmp_path):
    """Three int64 [1, 256] inputs with opaque names: mapped in data.text.inputs, padded to 256."""
    lines = ["今日は良い天気です。", "東京都に住んでいます。", "猫が好きです。"]
    _tokenizer(tmp_path / "tokenizer.json", sorted(set("".join(lines))), by_character=True)
    (tmp_path / "calib.txt").write_text("\n".join(lines) + "\n")
    recipe = _recipe(tmp_path, "    inputs: {input.1: input_ids, 'onnx::Unsqueeze_1': attention_mask, "
                               "input.3: token_type_ids}\n")
    model = onnx.load(SHARED_MODELS / "albert_ja_pos" / "model.onnx")
    source = open_data(tmp_path / "calib.txt", model_inputs(model),  None,
                       parse_recipe(recipe.read_text(), recipe))
    samples = [feeds for _, feeds in source.samples()]
    assert len(samples) == 3 and all(feeds["input.1"].shape == (1, 256) for feeds in samples)
    assert samples[0]["onnx::Unsqueeze_1"].sum() == len(lines[0]) + 2  # characters + [CLS] + [SEP]
    outputs = run(make_session(model), samples[0])
    assert all(np.isfinite(value).all() for value in outputs.values() if value.dtype.kind == "f")


def test_without_the_tokenizers_library_the_cli_exits_2_naming_the_extra(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from qtool.cli.main import main

    _tokenizer(tmp_path / "tokenizer.json", WORDS)
    model_path = _encoder(tmp_path / "enc.onnx", "seq")
    (tmp_path / "calib.txt").write_text("the cat\n")
    recipe = _recipe(tmp_path, "")
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # `import tokenizers` now fails
    result = CliRunner().invoke(main, ["calibrate", str(model_path), "--data", str(tmp_path / "calib.txt"),
                                       "--recipe", str(recipe), "--output", str(tmp_path / "t.json")])
    assert result.exit_code == 2
    assert "data.text needs the `tokenizers` library" in result.output
    assert "pip install 'qtool-onnx[text]'" in result.output


def test_a_line_the_model_fails_on_is_named_by_file_and_line(tmp_path):
    _tokenizer(tmp_path / "tokenizer.json", [*WORDS, "zebra"])  # one id past the model's embedding table
    model_path = _encoder(tmp_path / "enc.onnx", "seq")
    (tmp_path / "calib.txt").write_text("the cat sat\nthe zebra ran\n")
    with pytest.raises(DataError, match=r"calib\.txt:2: ONNX Runtime failed to run the float model on this input"):
        qtool.calibrate(model_path, tmp_path / "calib.txt", _recipe(tmp_path, "    max_length: 8\n"))


def test_the_tokenizer_is_never_written_over(tmp_path):
    tokenizer = _tokenizer(tmp_path / "tokenizer.json", WORDS)
    before = tokenizer.read_bytes()
    model_path = _encoder(tmp_path / "enc.onnx", "seq")
    (tmp_path / "calib.txt").write_text("the cat sat\n")
    with pytest.raises(UsageError, match="tokenizer.json"):
        qtool.calibrate(model_path, tmp_path / "calib.txt", _recipe(tmp_path, ""), tokenizer, overwrite=True)
    assert tokenizer.read_bytes() == before


def test_exact_match_of_tags_leaves_padding_out(tmp_path):
    """An int64 tag per position: only the positions the attention mask keeps are scored (a padded
    position's tag is no answer), and the report says which input masked them."""
    _tokenizer(tmp_path / "tokenizer.json", WORDS)
    model_path = _tagger(tmp_path / "tagger.onnx", 16)
    (tmp_path / "calib.txt").write_text("\n".join(_sentences(1, 24)) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(_sentences(2, 16)) + "\n")
    recipe = _recipe(tmp_path, "validation:\n  gates: {min_exact_match: 0.9}\n")
    result = qtool.quantize(model_path, tmp_path / "calib.txt", recipe, validation_data=tmp_path / "eval.txt")
    float_session, quant_session = make_session(onnx.load(model_path)), make_session(result.model)
    source = open_data(tmp_path / "eval.txt", model_inputs(onnx.load(model_path)), None,
                       parse_recipe(recipe.read_text(), recipe))
    equal = kept = equal_all = count = 0
    for _, feeds in source.samples():
        same = run(float_session, feeds)["tags"] == run(quant_session, feeds)["tags"]
        keep = feeds["attention_mask"] != 0
        equal, kept = equal + int((same & keep).sum()), kept + int(keep.sum())
        equal_all, count = equal_all + int(same.sum()), count + same.size
    tags = result.report["validation"]["outputs"]["tags"]
    assert tags["exact_match_masked_by"] == "attention_mask" and tags["exact_match_positions"] == kept < count
    assert tags["exact_match"] == pytest.approx(equal / kept)
    assert equal / kept > equal_all / count + 0.05  # padding's near-tied tags would drag the figure down
    assert result.passed
    jsonschema = pytest.importorskip("jsonschema")
    from qtool.reporting.document import render_json
    from qtool.reporting.markdown import render_markdown
    from qtool.reporting.schemas import report_schema
    jsonschema.validate(json.loads(render_json(result.report)), report_schema("report"))
    assert f"over the {kept} positions where input attention\\_mask is non-zero (padding not scored)" \
        in render_markdown(result.report)
