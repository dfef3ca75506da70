"""Resolving a recipe parameter to the number one tensor uses.

mergekit lets a parameter vary across the model: a scalar, a layer gradient (a list spread
evenly over the layers), or name filters with a fallback (e.g. attention vs MLP). fedmerge must
give the same number for every tensor or the same recipe would merge differently.
"""

from __future__ import annotations

import re

from common.merge.config import FilterValue, ParamValue

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_position(name: str, num_layers: int) -> float:
    """Where tensor `name` sits along the depth, in [0, 1]: layer i of n is i/(n-1).

    Tensors outside the layer stack (embeddings, final norm, lm_head) sit at 0, so they take
    a gradient's first value, as mergekit does.
    """
    match = _LAYER.search(name)
    if match is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return int(match.group(1)) / (num_layers - 1)


def interpolate(values: list[float], x: float) -> float:
    """Linear interpolation over evenly spaced `values` at position x·(m-1)."""
    if len(values) == 1:
        return float(values[0])
    pos = x * (len(values) - 1)
    lo = min(int(pos), len(values) - 2)
    frac = pos - lo
    return float(values[lo]) * (1.0 - frac) + float(values[lo + 1]) * frac


def resolve(value: ParamValue, name: str, num_layers: int) -> float | bool | None:
    """The value of a parameter for tensor `name`; None when no filter matches and there is
    no fallback (the method default then applies)."""
    if isinstance(value, bool | int | float):
        return value
    if value and isinstance(value[0], FilterValue):
        chosen = next((v for v in value if v.filter is not None and v.filter in name), None)
        if chosen is None:
            chosen = next((v for v in value if v.filter is None), None)
        if chosen is None:
            return None
        inner = chosen.value
        if isinstance(inner, list):
            return interpolate(inner, layer_position(name, num_layers))
        return float(inner)
    return interpolate([float(v) for v in value], layer_position(name, num_layers))


class ParamResolver:
    """Per-tensor parameters of a recipe: per-model values override global ones; defaults last."""

    def __init__(self, config, num_layers: int):
        self.config = config
        self.spec = config.spec
        self.num_layers = num_layers

    def model_params(self, model: str, name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        own = self.config.model_parameters(model)
        for key, default in self.spec.model_params.items():
            value = None
            if key in own:
                value = resolve(own[key], name, self.num_layers)
            if value is None and key in self.config.parameters:
                value = resolve(self.config.parameters[key], name, self.num_layers)
            if value is None:
                value = default
            if value is None:
                raise _missing(key, name, model)
            out[key] = float(value)
        return out

    def global_params(self, name: str) -> dict[str, float | bool]:
        out: dict[str, float | bool] = {}
        for key, default in self.spec.global_params.items():
            value = None
            if key in self.config.parameters:
                value = resolve(self.config.parameters[key], name, self.num_layers)
            if value is None:
                value = default
            if value is None:
                raise _missing(key, name, None)
            out[key] = value if key in self.spec.bool_params else float(value)
        return out


def _missing(key: str, name: str, model: str | None):
    from common.errors import FedmergeError

    who = f" of model {model}" if model else ""
    return FedmergeError(
        f"parameters.{key}{who}: no filter matches tensor {name} and there is no fallback entry"
    )
