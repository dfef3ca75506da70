"""The merge methods fedmerge supports, with the parameters each accepts (mergekit 0.1.5 names).

The table is plain data (no torch import) so the recipe can be validated before anything heavy
loads; `merge_function(name)` imports the method's module only when a merge actually runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

REQUIRED = None  # marks a parameter without a default


@dataclass(frozen=True)
class MethodSpec:
    """What a method needs: a base model or not, and its parameters with defaults.

    `model_params` may be set per model or globally (the per-model value wins, as in mergekit);
    `global_params` only at the top level of `parameters`.
    """

    name: str
    needs_base: bool
    model_params: dict[str, float | None] = field(default_factory=dict)
    global_params: dict[str, float | bool | None] = field(default_factory=dict)
    bool_params: frozenset[str] = frozenset({"normalize", "rescale"})
    two_models: bool = False

    @property
    def all_params(self) -> list[str]:
        return [*self.model_params, *self.global_params]


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        "linear", needs_base=False, model_params={"weight": REQUIRED},
        global_params={"normalize": True},
    ),
    "slerp": MethodSpec(
        "slerp", needs_base=True, global_params={"t": REQUIRED}, two_models=True,
    ),
    "task_arithmetic": MethodSpec(
        "task_arithmetic", needs_base=True, model_params={"weight": REQUIRED},
        global_params={"lambda": 1.0, "normalize": False},
    ),
    "ties": MethodSpec(
        "ties", needs_base=True, model_params={"weight": REQUIRED, "density": 1.0},
        global_params={"lambda": 1.0, "normalize": True},
    ),
    "dare_linear": MethodSpec(
        "dare_linear", needs_base=True, model_params={"weight": REQUIRED, "density": 1.0},
        global_params={"lambda": 1.0, "normalize": False, "rescale": True},
    ),
    "dare_ties": MethodSpec(
        "dare_ties", needs_base=True, model_params={"weight": REQUIRED, "density": 1.0},
        global_params={"lambda": 1.0, "normalize": True, "rescale": True},
    ),
}

_MODULES = {
    "linear": "linear",
    "slerp": "slerp",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare",
    "dare_ties": "dare",
}


def merge_function(name: str) -> Callable:
    """The per-tensor function of method `name`: `fn(job) -> torch.Tensor` (see `TensorJob`)."""
    module = importlib.import_module(f"common.merge.methods.{_MODULES[name]}")
    return getattr(module, f"merge_{name}")
