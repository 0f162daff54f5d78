"""How to install one of corral's extras, said the same way by every message that needs one."""

from __future__ import annotations

__all__ = ["install_hint"]


def install_hint(extra: str) -> str:
    """The command that installs corral's ``extra``, from the package index and
    from a checkout of corral's source (where ``corral[extra]`` would look for
    corral on the index, or replace an editable install)."""
    return f"pip install 'corral[{extra}]' (in a checkout of corral: pip install -e '.[{extra}]')"
