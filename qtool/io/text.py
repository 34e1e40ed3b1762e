"""Text files become token inputs: one sample a line of a `.txt`, or a `.jsonl` line's text field,
tokenized with a Hugging Face `tokenizer.json` (the `tokenizers` library), cut and padded to
`max_length`, and mapped onto the model's inputs by name (input_ids, attention_mask, token_type_ids).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from qtool.errors import DataError, RecipeError, reason
from qtool.io.batching import InputSpec, batch_axes
from qtool.io.samples import DataSource, listed_files
from qtool.recipe.inputs import TEXT_ROLES, TextSpec

TEXT_SUFFIXES = (".jsonl", ".txt")
DEFAULT_LENGTH = 128
INSTALL = "pip install 'qtool-onnx[text]'"
# Name fragments that say which tokenizer output an input takes, most specific first.
ROLE_HINTS = (("token_type", "token_type_ids"), ("segment", "token_type_ids"), ("mask", "attention_mask"),
              ("input_ids", "input_ids"), ("ids", "input_ids"))


def text_roles(spec: TextSpec, inputs: list[InputSpec], where: str, skip: set[str] = frozenset()) -> dict[str, str]:
    """Model input name -> the tokenizer output it receives (`spec.inputs`, else guessed from the names);
    an input left without one (but those in `skip`, e.g. state) is a RecipeError naming `where`."""
    names = [spec_.name for spec_ in inputs if spec_.name not in skip]
    if spec.inputs is not None:
        unknown = [name for name in spec.inputs if name not in names]
        if unknown:
            raise RecipeError(f"{where}: data.text.inputs: {unknown[0]!r} is not a model input; "
                              f"the model's inputs: {', '.join(names)}")
        roles = dict(spec.inputs)
    else:
        roles = {name: role for name in names
                 if (role := next((r for hint, r in ROLE_HINTS if hint in name.lower()), None))}
    missing = [name for name in names if name not in roles]
    if missing:
        raise RecipeError(f"{where}: data.text: no tokenizer output for model input {missing[0]!r}; map each "
                          f"input in data.text.inputs to one of {', '.join(TEXT_ROLES)}")
    return roles


def fixed_lengths(inputs: list[InputSpec], names) -> set[int]:
    """The sequence lengths the named inputs fix: their last dimension but the batch, where it is a number."""
    axes = batch_axes(inputs)
    fixed = set()
    for input_spec in inputs:
        if input_spec.name in names and input_spec.shape:
            dims = [dim for axis, dim in enumerate(input_spec.shape) if axis != axes[input_spec.name].axis]
            if dims and isinstance(dims[-1], int) and dims[-1] > 0:
                fixed.add(dims[-1])
    return fixed


def sequence_length(spec: TextSpec, inputs: list[InputSpec], roles: dict[str, str], where: str) -> int:
    """`max_length`, checked against (and by default taken from) a sequence length the model fixes."""
    fixed = fixed_lengths(inputs, roles)
    if len(fixed) > 1:
        raise DataError(f"{where}: the model's token inputs fix different lengths {sorted(fixed)}")
    if fixed and spec.max_length is not None and spec.max_length not in fixed:
        raise RecipeError(f"{where}: data.text.max_length {spec.max_length}: the model fixes its sequence "
                          f"length at {min(fixed)}; set max_length to {min(fixed)} or leave it out")
    if fixed and spec.padding == "none":
        raise RecipeError(f"{where}: data.text.padding none: the model fixes its sequence length at "
                          f"{min(fixed)}, so every sample is padded to it; use padding: max_length")
    return spec.max_length or (min(fixed) if fixed else DEFAULT_LENGTH)


def load_tokenizer(path: Path, where: str):
    """A `tokenizers.Tokenizer` from a tokenizer.json; a missing library or a bad file is a RecipeError."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise RecipeError(f"{where}: data.text needs the `tokenizers` library ({reason(exc)}): {INSTALL}") from None
    if not path.is_file():
        raise RecipeError(f"{where}: data.text.tokenizer: no such file {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises its own Exception type on any defect
        raise RecipeError(f"{where}: data.text.tokenizer {path}: not a readable tokenizer.json "
                          f"({reason(exc)})") from None


class TextSource(DataSource):
    """The lines of one text file or a folder of them, one sample each, named `<file>:<line>`."""

    def __init__(self, path: str | Path, inputs: list[InputSpec], limit: int | None, spec: TextSpec,
                 tokenizer_path: Path, where: str, skip: set[str] = frozenset()):
        super().__init__(inputs, limit)
        self.folder = Path(path)
        self.spec, self.tokenizer_path, self.recipe_where, self.skip = spec, tokenizer_path, where, set(skip)
        self.roles = text_roles(spec, inputs, where, self.skip)
        self.mask_input = next((name for name, role in self.roles.items() if role == "attention_mask"), None)
        self.length = sequence_length(spec, inputs, self.roles, where)
        self.tokenizer = load_tokenizer(tokenizer_path, where)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.length)
        if spec.padding == "max_length":
            self.tokenizer.enable_padding(length=self.length, pad_id=self._pad_id())
        self.paths = listed_files(self.folder, TEXT_SUFFIXES)
        self.lines = [entry for path in self.paths for entry in self._read(path)]
        if not self.lines:
            raise DataError(f"{self.folder}: no text to calibrate with (no non-empty line in "
                            f"{', '.join(TEXT_SUFFIXES)} files)")
        self.total = min(len(self.lines), limit) if limit else len(self.lines)

    def _pad_id(self) -> int:
        vocabulary = self.tokenizer.get_vocab()
        return next((vocabulary[token] for token in ("[PAD]", "<pad>", "<PAD>", "[pad]") if token in vocabulary), 0)

    def _read(self, path: Path) -> list[tuple[str, str, str]]:
        """(sample name, where for messages, text) per non-empty line."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read text (UTF-8 expected): {reason(exc)}") from None
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            text = line
            if path.suffix.lower() == ".jsonl":
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise DataError(f"{path}:{number}: not a JSON object ({reason(exc)})") from None
                text = record.get(self.spec.field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{number}: no text under key {self.spec.field!r} "
                                    "(data.text.field names it)")
            entries.append((f"{path.name}:{number}", f"{path}:{number}", text))
        return entries

    @property
    def files(self) -> list[str]:
        return [name for name, _, _ in self.lines]

    def where(self, name: str) -> str:
        return next((where for known, where, _ in self.lines if known == name), str(self.folder))

    def _raw(self):
        for index, (name, where, text) in enumerate(self.lines):
            if self.limit is not None and index >= self.limit:
                return
            encoding = self.tokenizer.encode(text)
            values = {"input_ids": encoding.ids, "attention_mask": encoding.attention_mask,
                      "token_type_ids": encoding.type_ids}
            yield name, where, {input_name: np.asarray(values[role], dtype=np.int64)
                                           for input_name, role in self.roles.items()}

    def listing_hash(self) -> str:
        """sha256 over the tokenizer file and every text file's name and bytes."""
        digest = hashlib.sha256(self.tokenizer_path.read_bytes())
        for path in self.paths:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()

    def reopen(self, limit: int | None) -> "TextSource":
        other = TextSource(self.folder, self.inputs, limit, self.spec, self.tokenizer_path, self.recipe_where,
                           self.skip)
        other.state, other.notes = self.state, self.notes
        return other
