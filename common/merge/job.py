"""What a merge method sees for one tensor: the base, the other models' tensors, and the
parameters already resolved for this tensor's name and depth."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TensorJob:
    """One tensor's merge inputs; tensors are in the compute dtype (float32, float64 for f64).

    `base` is None for methods without a base model (linear); `tensors[i]` belongs to the i-th
    contributing model of the recipe, whose own parameters are `model_params[i]`.
    """

    name: str
    base: object | None
    tensors: list
    model_params: list[dict[str, float]]
    params: dict[str, float | bool]
    seed: int = 0
    cache: dict = field(default_factory=dict)
