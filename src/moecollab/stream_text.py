"""Keep executed notebooks light: text outputs as a terminal would show them, floods shortened.

A cell's printed text is stored as it was written: every refresh of a progress bar (``\\r``,
and ``ESC[A`` for the inner bar of nested bars) and every line of a library that logs once per
item. :func:`lighten_notebook` replaces each stream output by what a terminal would show at the
end (:func:`render_terminal`) and shortens what is still longer than ``max_lines`` to its
beginning and end, with one line saying how many lines were left out and where the full text
is: the runner writes every stream, whole, to ``artifacts/<profile>/logs/<stage>.log``.
"""

from __future__ import annotations

import re

MAX_LINES = 200  # per stream output of a cell; a longer one keeps its first 3/5 and last 1/5
_CONTROL = re.compile(r"(\x1b\[[0-9;?]*[A-Za-z]|\r|\n)")


def render_terminal(text: str) -> str:
    r"""The text a terminal shows after printing ``text``: carriage returns and cursor-up
    moves overwrite, other escape sequences (colours) are dropped, trailing spaces trimmed.

    Examples
    --------
    >>> render_terminal("step 1\rstep 2\rstep 3\ndone\n")
    'step 3\ndone\n'
    >>> render_terminal("outer 0%\n inner 50%\x1b[A\router 100%\n inner 100%\n")
    'outer 100%\n inner 100%\n'
    >>> render_terminal("\x1b[31mred\x1b[0m")
    'red'
    """
    lines = [""]
    row = column = 0
    for token in _CONTROL.split(text):
        if not token:
            continue
        if token == "\n":
            row, column = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif token == "\r":
            column = 0
        elif token.startswith("\x1b["):
            count = int(token[2:-1]) if token[2:-1].isdigit() else 1
            if token.endswith("A"):
                row = max(0, row - count)
            elif token.endswith("B"):
                row += count
                lines += [""] * (row + 1 - len(lines))
            elif token.endswith("K"):
                lines[row] = lines[row][:column]
        else:
            line = lines[row].ljust(column)
            lines[row] = line[:column] + token + line[column + len(token):]
            column += len(token)
    return "\n".join(line.rstrip() for line in lines)


def shorten(text: str, where: str, max_lines: int = MAX_LINES) -> str:
    """``text`` itself, or its first and last lines with one line about the rest.

    Examples
    --------
    >>> text = "".join(f"line {n}\\n" for n in range(500))
    >>> print(shorten(text, "run.log", max_lines=10))
    line 0
    line 1
    line 2
    line 3
    line 4
    line 5
    ... 492 more lines not stored here (the whole text is in run.log) ...
    line 498
    line 499
    <BLANKLINE>
    """
    lines = text.splitlines(keepends=True)
    if len(lines) <= max_lines:
        return text
    head, tail = max_lines * 3 // 5, max_lines // 5
    note = (f"... {len(lines) - head - tail:,} more lines not stored here "
            f"(the whole text is in {where}) ...\n")
    return "".join(lines[:head]) + note + "".join(lines[-tail:])


def lighten_notebook(notebook, log_name: str) -> str:
    """Render and shorten every stream output of ``notebook`` in place.

    Returns the whole rendered text of every stream, cell by cell, for the log file that
    ``log_name`` names in the note of a shortened output.
    """
    log = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") != "stream":
                continue
            text = render_terminal(output["text"])
            log.append(f"--- cell {index} ({output['name']})\n{text}\n")
            output["text"] = shorten(text, log_name)
    return "".join(log)
