"""Which points of two runs are the same point: the same implementation, case and options.

A point's identity is what ran: the implementation, the case and the options it ran with (each
row stores them resolved, defaults laid over). A series' name is not enough either way: an
implementation whose options were edited in the suite (``block: 256`` to ``block: 1024``) keeps
its name, and a variant's name (``performer[features=64]``, settings/variants.py) holds only the
swept options, so a sweep narrowed to one value renames the same point ``performer``.

Points of one series and case whose options differ are still paired, so that they can be shown
as changed options; they are never compared as if they were the same point. A row written before
an option existed lacks it, and the harness cannot know that the option's value now behaves as
the code did then (sparse's ``flex_block_size: null`` changed the CPU's flex blocks from 128 to
64): that is a change of options too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from attnbench.settings.variants import setting_text, split_series
from attnbench.storage.results import Row


@dataclass(frozen=True)
class Pair:
    base: Row
    new: Row

    @property
    def options_changed(self) -> bool:
        return options_key(self.base.options) != options_key(self.new.options)


def options_key(options: Any) -> str:
    """Options (or one value) as canonical JSON: lists and tuples alike, keys in order, 1 and true apart."""
    return json.dumps(options, sort_keys=True, default=str)


def pair_points(base: Sequence[Row], new: Sequence[Row]) -> tuple[list[Pair], list[Row], list[Row]]:
    """The pairs, the base's rows left unpaired, the new run's rows left unpaired. Each row is in
    one pair at most; the same series with the same options first, then the same implementation
    and options under another series name, then the same series with other options."""
    keys: tuple[Callable[[Row], Hashable], ...] = (
        lambda row: (row.implementation, row.case, options_key(row.options)),
        lambda row: (split_series(row.implementation)[0], row.case, options_key(row.options)),
        lambda row: (row.implementation, row.case),
    )
    pairs: list[Pair] = []
    base_left, new_left = list(base), list(new)
    for key in keys:
        waiting: dict[Hashable, Row] = {}
        for row in new_left:
            waiting.setdefault(key(row), row)
        unpaired = []
        for row in base_left:
            partner = waiting.pop(key(row), None)
            if partner is None:
                unpaired.append(row)
            else:
                pairs.append(Pair(row, partner))
        paired_new = {id(pair.new) for pair in pairs}
        base_left, new_left = unpaired, [row for row in new_left if id(row) not in paired_new]
    return pairs, base_left, new_left


def options_change(base: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs, old → new: ``block=256 → block=1024``; a key one row lacks is ``not set``."""
    keys = [key for key in sorted({*base, *new})
            if key not in base or key not in new or options_key(base[key]) != options_key(new[key])]

    def side(options: Mapping[str, Any]) -> str:
        return ", ".join(f"{key}={setting_text(options[key])}" if key in options else f"{key} not set"
                         for key in keys)

    return f"{side(base)} → {side(new)}"

