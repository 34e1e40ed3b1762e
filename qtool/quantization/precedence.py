"""Recipe precedence, the one place it is applied: exclude > name/tensor override > op-type override > defaults.

`resolve_settings` gives a node its activation and weight settings, its mode (static or dynamic)
and whether an override keeps it float, naming the override that set each key.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtool.recipe import patterns
from qtool.recipe.schema import ActivationSpec, MatchSpec, OverrideSpec, QuantizationSpec, WeightSpec


@dataclass(frozen=True)
class NodeSettings:
    activations: ActivationSpec
    weights: WeightSpec
    float_by: str | None  # the override that keeps the node float, if any
    mode: str  # "static" or "dynamic"
    sources: dict[str, str]  # "weights.dtype" -> the override that set it (absent: defaults)


def _describe_match(index: int, override: OverrideSpec) -> str:
    keys = ", ".join(f"{k} {v!r}" for k, v in override.match.model_dump(exclude_none=True).items())
    return f"overrides[{index}] ({keys})"


def _matches(match: MatchSpec, node) -> bool:
    if match.op_type is not None and node.op_type != match.op_type:
        return False
    if match.name is not None and not patterns.fullmatch(match.name, node.name):
        return False
    if match.tensor is not None and not any(
        name and patterns.fullmatch(match.tensor, name) for name in list(node.input) + list(node.output)
    ):
        return False
    return True


def resolve_settings(node, quant: QuantizationSpec) -> NodeSettings:
    """The one place recipe precedence is applied, key by key.

    Name and tensor matches outrank op-type matches; within a rank the earlier
    override wins; keys no override sets come from the defaults.
    """
    matching = [(i, o) for i, o in enumerate(quant.overrides) if _matches(o.match, node)]
    ranked = [m for m in matching if m[1].match.names_nodes] + [m for m in matching if not m[1].match.names_nodes]
    values: dict[str, dict] = {"activations": {}, "weights": {}}
    sources: dict[str, str] = {}
    float_by = None
    float_decided = False
    mode = quant.mode
    for i, override in ranked:
        if override.mode is not None:
            mode = override.mode
            sources["mode"] = _describe_match(i, override)
            break
    for i, override in ranked:
        if override.float is not None and not float_decided:
            float_decided = True
            float_by = _describe_match(i, override) if override.float else None
        for section in ("activations", "weights"):
            patch = getattr(override, section)
            if patch is None:
                continue
            for key, value in patch.model_dump(exclude_none=True).items():
                if key not in values[section]:
                    values[section][key] = value
                    sources[f"{section}.{key}"] = _describe_match(i, override)
    return NodeSettings(
        quant.activations.model_copy(update=values["activations"]),
        quant.weights.model_copy(update=values["weights"]),
        float_by, mode, sources,
    )


def settings_reason(settings: NodeSettings) -> str:
    by_source: dict[str, list[str]] = {}
    for key, source in settings.sources.items():
        by_source.setdefault(source, []).append(key)
    return "".join(f"; {', '.join(keys)}: {source}" for source, keys in by_source.items())


def unmatched_overrides(graph, quant: QuantizationSpec) -> list[str]:
    """One warning per override, and per `exclude` op type or node pattern, that matches no node of
    `graph` (a misspelt op type, another exporter's naming): it does nothing, and a recipe that silently
    does nothing is a lie."""
    hint = "matches no node of the model: it does nothing (`qtool inspect MODEL` lists the node names and op types)"
    op_types = {node.op_type for node in graph.node}
    return ([f"{_describe_match(i, override)} {hint}" for i, override in enumerate(quant.overrides)
             if not any(_matches(override.match, node) for node in graph.node)]
            + [f"exclude.op_types[{i}] ({op_type!r}) {hint}" for i, op_type in enumerate(quant.exclude.op_types)
               if op_type not in op_types]
            + [f"exclude.nodes[{i}] ({pattern!r}) {hint}" for i, pattern in enumerate(quant.exclude.nodes)
               if not any(patterns.fullmatch(pattern, node.name) for node in graph.node)])
