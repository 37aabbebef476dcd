"""The front door: every exported name exists and documents itself."""

from __future__ import annotations

import inspect

import traintrace as tt


def test_every_exported_name_exists_and_has_a_docstring():
    for name in tt.__all__:
        obj = getattr(tt, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_importing_does_not_configure_logging_or_pyplot():
    import logging
    import sys

    assert not logging.getLogger().handlers or all(
        type(h).__module__.startswith(("_pytest", "logging")) for h in logging.getLogger().handlers
    )
    assert "matplotlib.pyplot" not in sys.modules
