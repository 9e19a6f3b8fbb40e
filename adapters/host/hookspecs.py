"""Every hook a plugin can implement.

A plugin is a module or object with functions decorated by `adapters.hookimpl`, registered by the
plugin manager (built-ins) or found through the ``adapters`` entry-point group (third parties)::

    import adapters

    @adapters.hookimpl
    def register_strategies(register):
        register(MyStrategy())
        register(MyStrategy(), aliases={"my-strategy-4bit": "nf4"})  # also under another name
"""
from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("adapters")
hookimpl = pluggy.HookimplMarker("adapters")


@hookspec
def register_strategies(register: Callable[..., None]) -> None:
    """Register fine-tuning strategies.

    Call ``register(strategy)`` once per strategy. A strategy is any object that satisfies the
    `adapters.Strategy` protocol; its ``name`` must be unique across all installed plugins.

    ``register(strategy, aliases={"qlora": "nf4"})`` also registers the strategy under each alias,
    with the alias's quantization as its default: ``qlora`` is ``lora`` on an nf4 base.
    """
