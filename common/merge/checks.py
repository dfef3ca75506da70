"""Pre-flight validation: every refusable problem is found before any output is written.

Merge users' worst experience is an error after minutes of work (or a silently broken model).
So all parents are opened (headers only), compared and scanned here, and the result is a
`MergePlan` the writer can execute without further checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import FedmergeError
from common.merge.params import ParamResolver
from common.model_io import CODE_OF, DTYPES, Checkpoint

ARCH_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


def arch_of(config: dict) -> dict:
    """The architecture fields of a config; GQA's kv heads default to the attention heads."""
    arch = {f: config.get(f) for f in ARCH_FIELDS}
    if arch["num_key_value_heads"] is None:
        arch["num_key_value_heads"] = arch["num_attention_heads"]
    return arch


def check_architectures(ckpts: list[Checkpoint]) -> None:
    ref = ckpts[0]
    ref_arch = arch_of(ref.config)
    for other in ckpts[1:]:
        arch = arch_of(other.config)
        for f in ARCH_FIELDS:
            if arch[f] != ref_arch[f]:
                raise FedmergeError(
                    f"{other.path / 'config.json'}: field {f} is {arch[f]!r} but "
                    f"{ref.path} has {ref_arch[f]!r}: parents must share one architecture"
                )


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its name, shape, and, when vocabularies differ, the base's row count."""

    name: str
    shape: tuple[int, ...]
    is_float: bool
    vocab_rows: int | None = None


def _vocab_size(ckpt: Checkpoint) -> int | None:
    value = ckpt.config.get("vocab_size")
    if value is None:
        value = (ckpt.config.get("text_config") or {}).get("vocab_size")
    return value


def check_tensors(ckpts: list[Checkpoint], keep_base_vocab: bool) -> list[TensorPlan]:
    """Same tensor names and shapes in every parent, except the vocabulary axis when the recipe
    keeps the base (first) model's vocabulary; returns the output tensors in the base's order."""
    ref = ckpts[0]
    ref_names = ref.names
    for other in ckpts[1:]:
        missing = [n for n in ref_names if n not in other.tensors]
        extra = [n for n in other.names if n not in ref.tensors]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {missing[0]}" + (f" and {len(missing) - 1} more"
                                                      if len(missing) > 1 else ""))
            if extra:
                parts.append(f"has {extra[0]} that {ref.path} lacks"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
            raise FedmergeError(
                f"{other.path}: tensor names differ from {ref.path}: {'; '.join(parts)}"
            )
    plans = []
    for name in ref_names:
        r = ref.tensors[name]
        vocab_rows = None
        for other in ckpts[1:]:
            o = other.tensors[name]
            if o.shape == r.shape:
                continue
            vocab_axis = (
                len(o.shape) == len(r.shape) >= 1
                and o.shape[1:] == r.shape[1:]
                and r.shape[0] == _vocab_size(ref)
                and o.shape[0] == _vocab_size(other)
            )
            if vocab_axis and keep_base_vocab:
                vocab_rows = r.shape[0]
                continue
            if vocab_axis:
                raise FedmergeError(
                    f"vocabulary size differs: tensor {name} is {list(r.shape)} in {ref.path} "
                    f"and {list(o.shape)} in {other.path}; set `tokenizer_source: base` to keep "
                    "the base model's vocabulary"
                )
            raise FedmergeError(
                f"tensor shapes differ: {name} is {list(r.shape)} in {ref.path} "
                f"and {list(o.shape)} in {other.path}"
            )
        if r.is_float != all(c.tensors[name].is_float for c in ckpts):
            raise FedmergeError(
                f"tensor {name}: floating point in some parents, integer in others "
                f"(e.g. {ref.path})"
            )
        plans.append(TensorPlan(name, r.shape, r.is_float, vocab_rows))
    return plans


def check_finite(ckpts: list[Checkpoint], names: list[str], progress=None) -> None:
    """NaN or inf in a parent poisons every merge; name the tensor instead of writing garbage."""
    import torch

    with torch.no_grad():
        for ckpt in ckpts:
            for name in names:
                info = ckpt.tensors[name]
                if info.is_float:
                    t = ckpt.get(name)
                    if not bool(torch.isfinite(t).all()):
                        kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
                        raise FedmergeError(
                            f"{info.file}: tensor {name} contains {kind}; parents must be finite"
                        )
                if progress is not None:
                    progress()


@dataclass
class MergePlan:
    """Everything the writer needs, all validated: open parents, roles, tensors, parameters."""

    config: object
    checkpoints: dict[str, Checkpoint]
    donor: str
    base: str | None
    contributors: list[str]
    tensors: list[TensorPlan]
    resolver: ParamResolver
    out_dtype_by_name: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        for c in self.checkpoints.values():
            c.close()


def prepare_merge(config, *, scan_values: bool = True, progress=None) -> MergePlan:
    """Open and validate every parent of `config`; raise FedmergeError on the first problem."""
    paths = config.model_paths()
    donor = config.donor()
    ordered = [donor, *[p for p in paths if p != donor]]
    ckpts = {p: Checkpoint(p) for p in ordered}
    check_architectures([ckpts[p] for p in ordered])
    plans = check_tensors([ckpts[p] for p in ordered], config.tokenizer_source == "base")
    num_layers = int(ckpts[donor].config.get("num_hidden_layers") or 0)
    resolver = ParamResolver(config, num_layers)
    contributors = config.contributors()
    for tp in plans:
        # Resolving every parameter for every tensor surfaces missing filters and zero weight
        # sums now rather than halfway through writing.
        params = resolver.global_params(tp.name)
        per_model = [resolver.model_params(m, tp.name) for m in contributors]
        if config.merge_method == "linear" and params["normalize"]:
            from common.merge.methods.linear import linear_coefficients

            linear_coefficients([p["weight"] for p in per_model], True, tp.name)
    out_dtype = {}
    for tp in plans:
        src = ckpts[donor].tensors[tp.name].dtype
        out_dtype[tp.name] = CODE_OF[config.dtype] if (config.dtype and tp.is_float) else src
        assert out_dtype[tp.name] in DTYPES
    if scan_values:
        check_finite([ckpts[p] for p in ordered], [tp.name for tp in plans], progress)
    return MergePlan(
        config=config,
        checkpoints=ckpts,
        donor=donor,
        base=config.base_model,
        contributors=contributors,
        tensors=plans,
        resolver=resolver,
        out_dtype_by_name=out_dtype,
    )
