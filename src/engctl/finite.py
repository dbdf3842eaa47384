"""Whether a value about to be sent as JSON holds a NaN or an infinity.

orjson writes those as `null`, where `json` writes `NaN`, `Infinity`, `-Infinity` (and engctl
keeps `json`'s meaning end to end). A `null` in orjson's bytes is most often a None: this tells
the two apart without `json` encoding the whole value again (16x orjson's time at 115 KB).
Stdlib only, nothing of engctl: `engctl.worker` runs inside engines and uses it too.
"""

from __future__ import annotations

import gc
import math

TYPE_CHECKING = False  # typing is not imported at run time (a worker's start)
if TYPE_CHECKING:
    from typing import Any

# The containers orjson writes as they are (a subclass of any is refused before this is asked).
_CONTAINERS = (dict, list, tuple)
_isfinite = math.isfinite


def nonfinite_float_in(value: Any) -> bool:
    """Whether a float among `value`'s dicts, lists and tuples, at any depth, is a NaN or an
    infinity. Walked level by level with `gc.get_referents` (C-speed: 0.38 ms at 115 KB where
    `json.dumps` takes 1.4 ms)."""
    if type(value) is float:
        return not _isfinite(value)
    level = [value] if type(value) in _CONTAINERS else []
    while level:
        items = gc.get_referents(*level)
        if not all(map(_isfinite, [x for x in items if type(x) is float])):
            return True
        level = [x for x in items if type(x) in _CONTAINERS]
    return False
