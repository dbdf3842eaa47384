"""Every command's --help, rendered as a user sees it: no bracketed word of the source text
is eaten by rich markup (issue 10.23: `metrics --help` lost `[daemon]`)."""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
from typing import Any

from tests.conftest import PY
from tests.system.test_cli_bad_input import _commands

# `[word]` in a help text; `\[word]` is how a source escapes it from rich markup.
BRACKETED = re.compile(r"\\?\[([^\[\]\s]+)\]")


def _texts(cmd: Any) -> list[str]:
    texts = [cmd.help or "", cmd.epilog or ""]
    texts += [getattr(p, "help", None) or "" for p in cmd.params]
    return texts


def _help(path: tuple[str, ...]) -> str:
    env = {**os.environ, "COLUMNS": "400", "TERMINAL_WIDTH": "400"}
    r = subprocess.run(
        [PY, "-m", "engctl", *path, "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_no_help_text_loses_a_bracketed_word() -> None:
    """Every `[word]` written in a command's help, options' help or epilog shows in its
    rendered --help."""
    wanted = {
        path: {f"[{m}]" for text in _texts(cmd) for m in BRACKETED.findall(text)}
        for path, cmd in _commands(groups=True)
    }
    assert any(wanted.values())  # the check has something to check
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        rendered = dict(zip(wanted, pool.map(_help, wanted), strict=True))
    lost = {
        " ".join(path): sorted(w for w in words if w not in rendered[path])
        for path, words in wanted.items()
    }
    assert not any(lost.values()), {k: v for k, v in lost.items() if v}
