"""Whether labels can score a model: labels it cannot produce are refused, and a float accuracy at
chance or labels covering part of the data are warned about (an accuracy gate would then judge noise)."""

from __future__ import annotations

from qtool.errors import DataError
from qtool.io.data import Labels


def check_label_range(labels: dict[str, int], names: list[str], classes: int, output: str) -> None:
    """Raise DataError (exit 2) naming the first of `names` whose label is not a class index of
    `output` ([N, `classes`] scores): such a label can never be right, so accuracy would read 0 for
    float and quantized alike and an accuracy gate pass on nothing."""
    for name in names:
        label = labels.get(name)
        if label is not None and not 0 <= label < classes:
            where = labels.where(name) if isinstance(labels, Labels) else f"{name} (its class folder)"
            raise DataError(f"{where}: label {label} for {name} is not a class of the model: output {output} "
                            f"scores {classes} classes, 0–{classes - 1}")


def label_warnings(samples: int, labelled: int, float_accuracy: float | None, classes: int,
                   source: str) -> list[str]:
    """Warnings on what an accuracy figure measured: labels (`source`) for none (`classes` 0: the first
    output is no class scores) or only `labelled` of `samples` evaluation samples, and a float top-1 at
    or below chance (1/`classes`), which says the labels or the preprocessing do not match the model
    rather than anything about quantization."""
    warnings = []
    if not labelled and samples:  # given, yet unused: say why rather than leave the accuracy out in silence
        why = "it names none of their files" if classes else "the model's first output is not class scores [N, classes]"
        warnings.append(f"{source} labels none of the {samples} validation samples ({why}): no top-1 accuracy measured")
    if labelled and labelled < samples:
        warnings.append(f"{source} labels {labelled} of the {samples} validation samples: top-1 accuracy and "
                        "max_accuracy_drop read those only")
    if labelled and classes >= 2 and float_accuracy is not None and float_accuracy <= 1.0 / classes:
        warnings.append(f"the float model's top-1 is {float_accuracy:.1%} on {labelled} labelled samples, at or "
                        f"below chance (1/{classes} = {1.0 / classes:.1%}): the labels ({source}) or the input "
                        "preprocessing do not match the model, so the accuracy figures say nothing about "
                        "quantization")
    return warnings


def labels_source(labels: dict) -> str:
    """Where `labels` came from, for a warning: the labels file, or the class folders."""
    return str(labels.source) if isinstance(labels, Labels) else "the class folders"
