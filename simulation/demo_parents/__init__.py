"""The built-in demo parents shipped with fedmerge (toys, no clinical validity).

Two tiny Llamas fine-tuned from one base on fedmerge's own public synthetic corpora: parent A
reads physiology (λ = 0, the merge's base model), parent B reads diagnoses and treatments
(λ = 1). They let `fedmerge simulate` show a meaningful λ curve at once, offline, on a CPU.
Rebuild them with `python -m simulation.build_demo_parents`.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import FedmergeError

PACKAGE_DIR = Path(__file__).resolve().parent
PARENT_A_DIR = PACKAGE_DIR / "parent_a_numeric"
PARENT_B_DIR = PACKAGE_DIR / "parent_b_clinical"


def demo_parent_dirs() -> tuple[Path, Path]:
    """(parent A, parent B): A is the base_model side (λ = 0), B is λ = 1."""
    for path in (PARENT_A_DIR, PARENT_B_DIR):
        if not (path / "config.json").is_file():
            raise FedmergeError(
                f"demo parent {path}: config.json is missing; expected the shipped checkpoint "
                "(rebuild with `python -m simulation.build_demo_parents`)"
            )
    return PARENT_A_DIR, PARENT_B_DIR
