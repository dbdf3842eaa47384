"""The modules generated from the typer app for the paths that run without it
(`completion_table.py`, `help_table.py`): one constant each, written as Python source.
Used when they are regenerated and by the tests that keep them current; imports no typer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def module_text(doc: str, name: str, value: Any, preamble: str = "\n") -> str:
    """The source of a module whose docstring is `doc` and whose only constant is
    `name: dict[str, Any] = value`; `preamble` goes between the two (a ruff directive)."""
    import pprint

    return (
        f'"""{doc}"""\n'
        f"{preamble}"
        "from __future__ import annotations\n\n"
        "TYPE_CHECKING = False\n"
        "if TYPE_CHECKING:\n"
        "    from typing import Any\n\n"
        "# fmt: off\n"
        f"{name}: dict[str, Any] = {pprint.pformat(value, width=99, sort_dicts=True)}\n"
    )


def write(module_file: str, name: str, text: str) -> None:
    """Write `text` as the module `name` next to `module_file` (the generator's own file)."""
    target = Path(module_file).with_name(name)
    target.write_text(text)
    print(f"wrote {target}")
