"""One small registry class for every extensible kind (models, datasets, pruners, losses).

Modelled on timm/torchvision: builders register under a name with a decorator, and
an unknown name lists the valid ones with a did-you-mean suggestion.
"""

import difflib
from typing import Callable, Dict, Generic, List, TypeVar

from .errors import ToolchainError

T = TypeVar("T")


class UnknownNameError(ToolchainError):
    """Raised for a name that is not registered."""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._entries, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid: {', '.join(self.names())}"

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
