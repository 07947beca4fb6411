"""Files shipped with distillflow, named as in the source tree.

`configs/…` (the default configs and DeepSpeed JSONs), `prompts/seeds/…` and
`prompts/templates/…` and `distillflow/assets/…` are package data: an installed package
finds them inside its own directories, a source checkout in the folders of the same name.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# First path component in the source tree → the package that ships it.
_PACKAGES = {"configs": "distillflow.configs", "prompts": "distillflow.prompts", "distillflow": "distillflow"}


def packaged(path: str | Path) -> Path:
    """The shipped file or folder that the source tree calls `path` (e.g. configs/demo.yaml)."""
    parts = Path(path).parts
    if not parts or parts[0] not in _PACKAGES:
        raise ValueError(f"{path}: not a shipped path; it must start with one of {sorted(_PACKAGES)}")
    return Path(str(resources.files(_PACKAGES[parts[0]]))).joinpath(*parts[1:])
