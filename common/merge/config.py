"""The merge recipe: a pydantic model that reads and writes mergekit-style YAML.

Merge users already write mergekit recipes; accepting the same shape (for the methods fedmerge
supports) means their recipes work unchanged, and writing the recipe next to the output makes
every merge reproducible. Anything fedmerge does not support is refused up front with the list
of what is, rather than silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError, model_validator

from common.errors import FedmergeError, validation_error
from common.merge.methods import METHODS

TOP_LEVEL_KEYS = ("models", "merge_method", "base_model", "parameters", "dtype",
                  "tokenizer_source")
MODEL_KEYS = ("model", "parameters")
GROUPS = ("attention", "mlp", "other")
# Name filters that select each group; "other" is the fallback entry without a filter.
GROUP_FILTERS = {"attention": "self_attn", "mlp": "mlp"}


class FilterValue(BaseModel):
    """One entry of a name-filter list; the entry without `filter` is the fallback."""

    model_config = ConfigDict(extra="forbid")

    filter: str | None = None
    value: float | list[float]


ParamValue = StrictBool | float | list[float] | list[FilterValue]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, ParamValue] = {}

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        # `- path/to/model` is accepted as `- model: path/to/model`.
        return {"model": data} if isinstance(data, str) else data


class MergeConfig(BaseModel):
    """A merge recipe (mergekit YAML shape): models, method, base model, parameters."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry]
    merge_method: str
    base_model: str | None = None
    parameters: dict[str, ParamValue] = {}
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer_source: Literal["base"] | None = None

    # ---- reading and writing -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: object, source: str = "recipe") -> MergeConfig:
        """Validate a parsed YAML mapping; every problem is one line naming `source` and the key."""
        if not isinstance(data, Mapping):
            raise FedmergeError(
                f"{source}: expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}"
            )
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                raise FedmergeError(
                    f"{source}: unknown key {key!r} (supported: {', '.join(TOP_LEVEL_KEYS)})"
                )
        method = data.get("merge_method")
        if method not in METHODS:
            raise FedmergeError(
                f"{source}: field merge_method: unknown method {method!r} "
                f"(supported: {', '.join(METHODS)})"
            )
        for i, entry in enumerate(data.get("models") or []):
            if isinstance(entry, Mapping):
                for key in entry:
                    if key not in MODEL_KEYS:
                        raise FedmergeError(
                            f"{source}: models[{i}]: unknown key {key!r} "
                            f"(supported: {', '.join(MODEL_KEYS)})"
                        )
        try:
            config = cls.model_validate(dict(data))
        except ValidationError as exc:
            raise validation_error(source, exc) from None
        config.check_parameters(source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergeConfig:
        from common.config_io import read_yaml_mapping

        return cls.from_dict(read_yaml_mapping(path, "merge recipe"), source=str(path))

    def to_dict(self) -> dict:
        data = self.model_dump(mode="json", exclude_none=True)
        for entry in data["models"]:
            if not entry["parameters"]:
                del entry["parameters"]
        if not data["parameters"]:
            del data["parameters"]
        return data

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---- semantics -------------------------------------------------------------------------
    @property
    def spec(self):
        return METHODS[self.merge_method]

    def check_parameters(self, source: str = "recipe") -> None:
        """Refuse unknown parameters, booleans where numbers belong, missing required ones,
        out-of-range SLERP t and non-finite numbers: all before any tensor is read."""
        spec = self.spec
        if not self.models:
            raise FedmergeError(f"{source}: field models: expected at least one model")
        for key, value in self.parameters.items():
            if key not in spec.all_params:
                raise FedmergeError(
                    f"{source}: parameters.{key}: not a parameter of {spec.name} "
                    f"(supported: {', '.join(spec.all_params)})"
                )
            _check_value(f"{source}: parameters.{key}", key, value, spec)
        for i, entry in enumerate(self.models):
            for key, value in entry.parameters.items():
                if key not in spec.model_params:
                    allowed = ", ".join(spec.model_params) or "none"
                    raise FedmergeError(
                        f"{source}: models[{i}].parameters.{key}: not a per-model parameter of "
                        f"{spec.name} (supported: {allowed})"
                    )
                _check_value(f"{source}: models[{i}].parameters.{key}", key, value, spec)
        contributors = self.contributors()
        for key, default in spec.model_params.items():
            if default is None and key not in self.parameters:
                for i, entry in enumerate(self.models):
                    if entry.model in contributors and key not in entry.parameters:
                        raise FedmergeError(
                            f"{source}: models[{i}].parameters.{key}: required by {spec.name} "
                            "(or set it once under the top-level parameters)"
                        )
        for key, default in spec.global_params.items():
            if default is None and key not in self.parameters:
                raise FedmergeError(f"{source}: parameters.{key}: required by {spec.name}")
        if spec.needs_base and self.base_model is None:
            raise FedmergeError(f"{source}: field base_model: required by {spec.name}")
        if self.tokenizer_source == "base" and self.base_model is None:
            raise FedmergeError(f"{source}: tokenizer_source: base needs base_model to be set")
        if spec.two_models:
            names = self.model_paths()
            if len(names) != 2 or self.base_model not in names:
                raise FedmergeError(
                    f"{source}: field models: {spec.name} merges exactly two models, one of them "
                    f"the base_model (got {len(names)}: {', '.join(names)})"
                )
        if spec.needs_base and not contributors:
            raise FedmergeError(
                f"{source}: field models: {spec.name} needs at least one model besides base_model"
            )

    def model_paths(self) -> list[str]:
        """Every distinct model of the recipe, base model included, in a fixed order."""
        out = [e.model for e in self.models]
        if self.base_model is not None and self.base_model not in out:
            out.insert(0, self.base_model)
        return list(dict.fromkeys(out))

    def contributors(self) -> list[str]:
        """Models combined with the base (for base-model methods: all but the base; for
        slerp: the other model)."""
        names = list(dict.fromkeys(e.model for e in self.models))
        if self.spec.needs_base:
            names = [n for n in names if n != self.base_model]
        return names

    def donor(self) -> str:
        """The model whose config and tokenizer the output gets: base, else the first listed.

        Deterministic on purpose: mergekit picks it from a set, so outputs varied run to run.
        """
        return self.base_model if self.base_model is not None else self.models[0].model

    def model_parameters(self, model: str) -> dict[str, ParamValue]:
        for entry in self.models:
            if entry.model == model:
                return entry.parameters
        return {}

    # ---- the federated search's recipe -----------------------------------------------------
    @classmethod
    def two_parent(
        cls,
        parent_a: str | Path,
        parent_b: str | Path,
        method: Literal["slerp", "linear"],
        lam: float | Mapping[str, float],
    ) -> MergeConfig:
        """The recipe whose written merge equals `InPlaceMerger(a, b, method).apply(lam)`.

        Parent A is the base model (λ = 0), parent B the other (λ = 1); a per-group λ becomes
        name filters `self_attn`, `mlp` and a fallback for everything else.
        """
        a, b = str(parent_a), str(parent_b)
        lams = normalize_lambda(lam, method)

        def param(fn) -> ParamValue:
            if isinstance(lams, float):
                return fn(lams)
            return [
                FilterValue(filter=GROUP_FILTERS.get(g), value=fn(lams[g]))
                for g in ("attention", "mlp", "other")
            ]

        if method == "slerp":
            return cls(
                models=[ModelEntry(model=a), ModelEntry(model=b)],
                merge_method="slerp",
                base_model=a,
                parameters={"t": param(lambda x: x)},
            )
        if method == "linear":
            return cls(
                models=[
                    ModelEntry(model=a, parameters={"weight": param(lambda x: 1.0 - x)}),
                    ModelEntry(model=b, parameters={"weight": param(lambda x: x)}),
                ],
                merge_method="linear",
                base_model=a,
                parameters={"normalize": True},
            )
        raise FedmergeError(f"method: expected slerp or linear, got {method!r}")


def normalize_lambda(lam: float | Mapping[str, float], method: str) -> float | dict[str, float]:
    """Validate λ (a float, or floats for some or all groups) and return it as float or dict.

    A search over, say, attention and MLP alone names those two groups; the tensors of the
    groups it leaves out (embeddings, norms, lm_head for `other`) take the mean of the named
    groups' λ, so they sit between them rather than at either parent.
    """
    if isinstance(lam, Mapping):
        keys = set(lam)
        if not keys or not keys <= set(GROUPS):
            raise FedmergeError(
                f"lambda: expected values for groups among {', '.join(GROUPS)}, "
                f"got {', '.join(sorted(map(str, keys))) or 'none'}"
            )
        given = {g: _check_lambda(lam[g], method, f"lambda[{g}]") for g in GROUPS if g in keys}
        rest = sum(given.values()) / len(given)
        return {g: given.get(g, rest) for g in GROUPS}
    return _check_lambda(lam, method, "lambda")


def _check_lambda(value, method: str, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise FedmergeError(f"{what}: expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise FedmergeError(f"{what}: expected a finite number, got {value!r}")
    if method == "slerp" and not 0.0 <= x <= 1.0:
        raise FedmergeError(f"{what}: slerp needs a value in [0, 1], got {x}")
    return x


def _numbers(value: ParamValue) -> list[float]:
    if isinstance(value, bool | float | int):
        return [float(value)]
    out: list[float] = []
    for item in value:
        if isinstance(item, FilterValue):
            out.extend([item.value] if isinstance(item.value, float) else item.value)
        else:
            out.append(float(item))
    return out


def _check_value(where: str, key: str, value: ParamValue, spec) -> None:
    if key in spec.bool_params:
        if not isinstance(value, bool):
            raise FedmergeError(f"{where}: expected true or false")
        return
    if isinstance(value, bool):
        raise FedmergeError(f"{where}: expected a number, a list or name filters, not a boolean")
    if isinstance(value, list):
        if not value:
            raise FedmergeError(f"{where}: expected a non-empty list")
        if isinstance(value[0], FilterValue):
            fallbacks = [v for v in value if v.filter is None]
            if len(fallbacks) > 1:
                raise FedmergeError(f"{where}: at most one entry without a filter (the fallback)")
            for v in value:
                if isinstance(v.value, list) and not v.value:
                    raise FedmergeError(f"{where}: filter {v.filter!r}: empty list")
    numbers = _numbers(value)
    if not all(math.isfinite(x) for x in numbers):
        raise FedmergeError(f"{where}: expected finite numbers, got {numbers}")
    if key == "t" and not all(0.0 <= x <= 1.0 for x in numbers):
        bad = next(x for x in numbers if not 0.0 <= x <= 1.0)
        raise FedmergeError(f"{where}: slerp t must lie in [0, 1], got {bad}")
    if key == "density" and not all(0.0 < x <= 1.0 for x in numbers):
        bad = next(x for x in numbers if not 0.0 < x <= 1.0)
        raise FedmergeError(f"{where}: density must lie in (0, 1], got {bad}")
