"""The patch mechanism: each change to stock vLLM is one record in patches/ (see its README).

A patch names its target by dotted path, the signature it was checked against, why it exists,
how it changes behaviour, the vLLM release it was checked on, the processes it must reach and
when it can be dropped. `apply()` resolves the target, refuses loudly if it moved or changed
signature, does nothing when the patch is already installed, and keeps the original reachable
as `__wrapped__` on the replacement.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

_MARK = "__vllm_ampere_patch__"


class PatchTargetMoved(RuntimeError):
    """The object a patch replaces is missing or no longer looks as the patch expects."""


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # "package.module:Attr.attr" (module, then attribute path)
    signature: str  # str(inspect.signature(original)) as checked; "" for non-callables
    why: str
    how: str
    vllm_checked: str
    processes: tuple[str, ...]  # e.g. ("engine core", "workers")
    remove_when: str
    # Builds the replacement from the original object.
    replace: Callable[[Any], Any] = field(repr=False, compare=False)
    # Whether the patch is needed in this process (e.g. only where an op is missing).
    needed: Callable[[], bool] = field(default=lambda: True, repr=False, compare=False)

    # -- resolution -------------------------------------------------------------------------
    def _owner_and_attr(self) -> tuple[Any, str]:
        module_name, _, attr_path = self.target.partition(":")
        if not attr_path:
            raise PatchTargetMoved(f"patch {self.name}: target {self.target!r} has no ':attr' part")
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError as e:
            raise PatchTargetMoved(f"patch {self.name}: module {module_name} is gone ({e})") from e
        *parents, attr = attr_path.split(".")
        for part in parents:
            if not hasattr(owner, part):
                raise PatchTargetMoved(f"patch {self.name}: {module_name}:{part} is gone")
            owner = getattr(owner, part)
        # Look in the owner's own namespace so an inherited attribute is not mistaken for it.
        namespace = vars(owner) if isinstance(owner, type) else owner.__dict__
        if attr not in namespace:
            raise PatchTargetMoved(f"patch {self.name}: {self.target} is gone")
        return owner, attr

    def original(self) -> Any:
        """The stock object (unwrapping our replacement if it is installed)."""
        owner, attr = self._owner_and_attr()
        current = _raw(owner, attr)
        return current.__wrapped__ if getattr(current, _MARK, None) == self.name else current

    def check(self) -> None:
        """Raise PatchTargetMoved unless the target exists with the recorded signature."""
        orig = _unbind(self.original())
        if self.signature:
            try:
                actual = str(inspect.signature(orig))
            except (TypeError, ValueError) as e:
                raise PatchTargetMoved(f"patch {self.name}: {self.target} is not callable ({e})") from e
            if actual != self.signature:
                raise PatchTargetMoved(
                    f"patch {self.name}: {self.target} changed signature: checked against "
                    f"{self.signature} on vLLM {self.vllm_checked}, found {actual}"
                )

    def is_applied(self) -> bool:
        owner, attr = self._owner_and_attr()
        return getattr(_unbind(_raw(owner, attr)), _MARK, None) == self.name

    def apply(self) -> bool:
        """Install the patch; True if it was installed now, False if already there or unneeded.

        `needed()` is asked first, so a patch for another platform (a CPU-build-only module on a
        CUDA install, say) never imports its target there.
        """
        if not self.needed() or self.is_applied():
            return False
        self.check()
        owner, attr = self._owner_and_attr()
        stock = _raw(owner, attr)
        new = self.replace(_unbind(stock))
        target_fn = _unbind(new)
        setattr(target_fn, _MARK, self.name)
        target_fn.__wrapped__ = _unbind(stock)
        if isinstance(stock, (staticmethod, classmethod)) and not isinstance(new, type(stock)):
            new = type(stock)(new)
        setattr(owner, attr, new)
        return True


def _raw(owner: Any, attr: str) -> Any:
    """The attribute as stored (a staticmethod stays a staticmethod)."""
    return vars(owner)[attr] if isinstance(owner, type) else getattr(owner, attr)


def _unbind(obj: Any) -> Any:
    return obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
