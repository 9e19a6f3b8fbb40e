"""Registering plugins for one test: `plugin_for`, the `registered` block and the `register_plugin` fixture."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..contract import Strategy


def plugin_for(*strategies: Strategy) -> object:
    """A plugin object whose ``register_strategies`` hook registers ``strategies``."""
    from ..host import hookimpl

    class StrategiesPlugin:
        @hookimpl
        def register_strategies(self, register):
            for strategy in strategies:
                register(strategy)

        def __repr__(self) -> str:
            return f"<plugin for {', '.join(getattr(s, 'name', '?') for s in strategies)}>"

    return StrategiesPlugin()


@contextlib.contextmanager
def registered(plugin: object, name: str | None = None, *, strict: bool = True) -> Iterator[str]:
    """Register ``plugin`` (a module or object with hook implementations) for the duration of a block.

    It is always unregistered afterwards. A misspelled or wrong-signature hook is rejected at once
    with an `AdaptersError` naming the plugin. With ``strict`` (the default) a failure in any of its
    registration hooks raises, as under ADAPTERS_STRICT_PLUGINS=1, instead of being skipped
    with a warning; pass ``strict=False`` to test the isolation of a broken plugin.
    """
    from ..host import manager

    pm = manager.get_plugin_manager()
    plugin_name = manager.register_checked(pm, plugin, name=name)
    if strict:
        manager._strict_plugins.add(plugin_name)
    try:
        yield plugin_name
    finally:
        manager._strict_plugins.discard(plugin_name)
        if pm.get_plugin(plugin_name) is not None:
            pm.unregister(name=plugin_name)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixture
    pytest = None

if pytest is not None:

    @pytest.fixture
    def register_plugin():
        """``register_plugin(plugin, name=None, strict=True)``: register a plugin for one test.

        Every plugin registered through it is unregistered when the test ends, whatever happens.
        """
        with contextlib.ExitStack() as stack:

            def register(plugin: object, name: str | None = None, strict: bool = True) -> object:
                stack.enter_context(registered(plugin, name, strict=strict))
                return plugin

            yield register
