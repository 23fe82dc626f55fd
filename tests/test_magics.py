"""A misused magic says what is wrong and how to fix it in one line, never a traceback."""
from __future__ import annotations

import pytest

from influence_nb.magics import MagicError

CASES = [
    ("%influence_query The capital city of Astrobia is Velmora",
     "%influence_query: write the query as `prompt || completion`"),
    ("%influence_query The capital city of Astrobia is || Velmora",
     "%influence_query: no session yet: run `%influence_session demo`"),
    ("%influence_scan -k 5", "%influence_scan: no session yet"),
    ("%%influence_lab --query 2 + 3 = || 5\n\n", "%influence_lab: the cell is empty"),
    ("%influence_session nowhere", "%influence_session: 'nowhere' is not `demo`, a variable"),
    ("%influence_session /nonexistent/model --corpus c.jsonl",
     "%influence_session: /nonexistent/model is not a Hugging Face model directory"),
]


@pytest.fixture
def shell(monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell
    monkeypatch.delenv("INFLUENCE_NB_TRACEBACK", raising=False)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "influence_nb")
    shell.run_line_magic("reload_ext", "influence_nb")   # a fresh magics object: no session
    return shell


@pytest.mark.parametrize("cell, message", CASES, ids=[c[1].split(":")[0] + str(i)
                                                     for i, c in enumerate(CASES)])
def test_a_misused_magic_is_one_line(shell, capsys, cell, message):
    result = shell.run_cell(cell)
    assert isinstance(result.error_in_exec, MagicError)
    out = capsys.readouterr()
    shown = (out.out + out.err).strip()
    assert shown.splitlines() == [f"MagicError: {result.error_in_exec}"], shown
    assert message in shown and "Traceback" not in shown


def test_the_traceback_is_there_on_request(shell, capsys, monkeypatch):
    monkeypatch.setenv("INFLUENCE_NB_TRACEBACK", "1")
    shell.run_cell(CASES[0][0])
    shown = capsys.readouterr()
    assert len((shown.out + shown.err).splitlines()) > 3
