"""The built-in demo parents shipped with fedmerge (toys, no clinical validity).

Two tiny Llamas fine-tuned from one base on fedmerge's own public synthetic corpora: parent A
reads physiology (λ = 0, the merge's base model), parent B reads diagnoses and treatments
(λ = 1). They let `fedmerge simulate` show a meaningful λ curve at once, offline, on a CPU.
Rebuild them with `python -m simulation.build_demo_parents`.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from common.errors import FedmergeError

PACKAGE_DIR = Path(__file__).resolve().parent
PARENT_A_NAME = "parent_a_numeric"
PARENT_B_NAME = "parent_b_clinical"
PARENT_A_DIR = PACKAGE_DIR / PARENT_A_NAME
PARENT_B_DIR = PACKAGE_DIR / PARENT_B_NAME
WEIGHTS = "model.safetensors"


def _installed_package_dir() -> Path | None:
    """Where the installed fedmerge keeps the demo parents.

    `flwr run .` imports the apps from a Flower app bundle (FAB) that carries code and small
    text files but no .safetensors, so this package's own folder may hold configs without
    weights; the installed distribution (editable or not) still has the full checkpoints.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution("fedmerge")
    except metadata.PackageNotFoundError:
        return None
    direct = dist.read_text("direct_url.json")
    if direct:
        info = json.loads(direct)
        url = urlparse(info.get("url", ""))
        if info.get("dir_info", {}).get("editable") and url.scheme == "file":
            return Path(url2pathname(url.path)) / "simulation" / "demo_parents"
    return Path(str(dist.locate_file("simulation/demo_parents")))


def demo_parent_dirs() -> tuple[Path, Path]:
    """(parent A, parent B): A is the base_model side (λ = 0), B is λ = 1."""
    def complete(root: Path) -> bool:
        return all(
            (root / name / "config.json").is_file() and (root / name / WEIGHTS).is_file()
            for name in (PARENT_A_NAME, PARENT_B_NAME)
        )

    tried = [PACKAGE_DIR]
    if not complete(PACKAGE_DIR):  # only inside a Flower app bundle
        installed = _installed_package_dir()
        if installed is not None and installed.resolve() != PACKAGE_DIR:
            tried.append(installed.resolve())
    for root in tried:
        if complete(root):
            return root / PARENT_A_NAME, root / PARENT_B_NAME
    raise FedmergeError(
        f"demo parents: no {PARENT_A_NAME}/{WEIGHTS} and {PARENT_B_NAME}/{WEIGHTS} under "
        f"{' or '.join(str(t) for t in tried)}; expected the shipped checkpoints "
        "(rebuild with `python -m simulation.build_demo_parents`)"
    )
