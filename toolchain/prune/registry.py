"""Pruner registry names (import-light: recipe validation reads it)."""

from ..registry import Registry

PRUNERS: Registry = Registry("pruner")
