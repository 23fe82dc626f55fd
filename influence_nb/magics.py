"""IPython magics for the notebook loop; ``%load_ext influence_nb`` registers them.

    %influence_session demo                              the demo world and its cached factors
    %influence_session inf                               a session already in a variable
    %influence_session MODEL_DIR --corpus FILE [--factors DIR]
    %influence_query The capital city of Astrobia is || Velmora
    %influence_scan -k 20                                explorer over the whole corpus
    %%influence_lab                                      each paragraph: a synthetic sequence

The session and query live on the magics object registered with the shell (no module state).
A misused magic (no session yet, a query without ``||``, a missing file) says so in one line
naming the fix, not in a traceback (``INFLUENCE_NB_TRACEBACK=1`` shows the traceback).
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython import get_ipython
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from .checks import checked, first_line
from .quiet import loading_quietly

__all__ = ["InfluenceMagics", "MagicError", "load_ipython_extension", "parse_paragraphs",
           "parse_query"]


class MagicError(RuntimeError):
    """A magic used the wrong way; the shell shows its message as one line."""

    def _render_traceback_(self) -> list[str]:
        """IPython's protocol for an exception that renders itself (the shell calls it instead
        of formatting a traceback): the message, one line — an error output in a kernel. With
        ``INFLUENCE_NB_TRACEBACK=1``, the shell's own traceback."""
        shell = get_ipython()
        if os.environ.get("INFLUENCE_NB_TRACEBACK") and shell is not None:
            return shell.InteractiveTB.structured_traceback(type(self), self, self.__traceback__)
        return [f"{type(self).__name__}: {self}"]


def _one_line(magic: Callable) -> Callable:
    """Turn the errors of a misused magic — ours and the library's one-line ValueErrors and
    OSErrors (a bad query, a missing corpus file or model directory) — into a
    :class:`MagicError` prefixed with the magic's name."""
    @functools.wraps(magic)
    def run(self, *args: Any) -> Any:
        try:
            return magic(self, *args)
        except (MagicError, ValueError, OSError) as e:
            raise MagicError(f"%{magic.__name__}: {first_line(e)}") from e
    return run


@checked()
def parse_query(line: str) -> tuple[str, str]:
    """``"prompt || completion"`` → (prompt, completion). Spaces around ``||`` become the single
    leading space of the completion (as a BPE tokenizer expects); ``prompt||completion`` joins
    the two without one."""
    if line.count("||") != 1:
        raise ValueError("write the query as `prompt || completion` (exactly one `||`)")
    left, right = line.split("||")
    prompt = left.strip()
    spaced = left[-1:].isspace() or right[:1].isspace()
    completion = (" " if spaced else "") + right.strip()
    if not prompt or not completion.strip():
        raise ValueError("both the prompt and the completion must be non-empty: "
                         "`prompt || completion`")
    return prompt, completion


_LABEL = re.compile(r"^\[([^\]\n]{1,40})\]\s*")


@checked()
def parse_paragraphs(cell: str) -> tuple[list[str], list[str]]:
    """Paragraphs separated by blank lines → (texts, labels); a paragraph may start with a
    ``[label]``."""
    texts, labels = [], []
    for para in re.split(r"\n\s*\n", cell.strip()):
        if not para.strip():
            continue
        m = _LABEL.match(para.strip())
        labels.append(m.group(1) if m else "")
        texts.append(para.strip()[m.end():] if m else para.strip())
    return texts, labels


@magics_class
class InfluenceMagics(Magics):
    """Holds one session (model + corpus + factors) and one query for this shell."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self.session: Any = None
        self.query: tuple[str, str] | None = None

    def _need_session(self) -> Any:
        if self.session is None:
            raise MagicError("no session yet: run `%influence_session demo` (or a model dir)")
        return self.session

    def _need_query(self) -> tuple[str, str]:
        if self.query is None:
            raise MagicError("no query yet: run `%influence_query prompt || completion`")
        return self.query

    @magic_arguments()
    @argument("source", help="`demo` for the embedded demo world, the name of a variable "
              "holding an Influence session, or a Hugging Face causal-LM directory")
    @argument("--corpus", help="training corpus for a model directory: .jsonl, .txt or .parquet")
    @argument("--text-field", default="text", help="the text column of the corpus")
    @argument("--max-len", type=int, default=128, help="tokens per training sequence")
    @argument("--factors", help="EK-FAC factors directory: loaded when it holds factors, else "
              "fitted and saved there (default: fitted once and cached)")
    @line_magic
    @_one_line
    def influence_session(self, line: str) -> Any:
        """Set the session: a model, its tokenizer, a corpus and fitted EK-FAC factors.
        Returns the :class:`~influence_nb.session.Influence`, so ``inf = %influence_session demo``.
        """
        from .session import Influence
        args = parse_argstring(self.influence_session, line)
        if args.source == "demo":
            self.session = Influence.demo()
        elif isinstance(self.shell.user_ns.get(args.source), Influence):
            self.session = self.shell.user_ns[args.source]
        else:
            self.session = _from_directory(args)
        self.query = None
        return self.session

    @line_magic
    @_one_line
    def influence_query(self, line: str) -> None:
        """Set the query: ``%influence_query prompt || completion``. The measurement is
        log p(completion | prompt); spaces around ``||`` become the completion's leading space.
        """
        pair = parse_query(line)
        queries = self._need_session().queries(pair)
        self.query = pair
        print(f"query: {pair[0]!r} → {pair[1]!r}   log p = {float(queries.f[0]):.4f}")

    @magic_arguments()
    @argument("-k", type=int, default=20, help="sequences listed per sign")
    @argument("-o", "--out", help="also store the InfluenceResult in this variable")
    @line_magic
    @_one_line
    def influence_scan(self, line: str) -> None:
        """Score every training sequence on the query and show the explorer."""
        from .widgets import InfluenceExplorer
        args = parse_argstring(self.influence_scan, line)
        result = self._need_session().scan(self._need_query())
        if args.out:
            self.shell.user_ns[args.out] = result
        display(InfluenceExplorer(result, k=args.k))

    @magic_arguments()
    @argument("--query", nargs="+", help="`prompt || completion` for this cell only "
              "(default: the one set with %%influence_query)")
    @cell_magic
    @_one_line
    def influence_lab(self, line: str, cell: str) -> Any:
        """Score synthetic training sequences against the query: each paragraph (separated by a
        blank line) is one sequence, optionally starting with a ``[label]``. Shows the lab,
        where the sequences can be edited and scored again; returns it."""
        from .widgets import SyntheticLab
        args = parse_argstring(self.influence_lab, line)
        query = parse_query(" ".join(args.query)) if args.query else self._need_query()
        texts, labels = parse_paragraphs(cell)
        if not texts:
            raise MagicError("the cell is empty: write one synthetic sequence per paragraph")
        return SyntheticLab(self._need_session(), query, texts, labels)


def _from_directory(args: Any) -> Any:
    """An Influence session for a Hugging Face model directory and a corpus file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import Corpus
    from .session import Influence
    if not args.corpus:
        raise MagicError(f"{args.source!r} is not `demo`, a variable holding an Influence "
                         "session, or a model directory with --corpus FILE")
    if not (Path(args.source) / "config.json").is_file():
        raise MagicError(f"{args.source} is not a Hugging Face model directory (no config.json);"
                         " pass a directory written by save_pretrained")
    with loading_quietly():
        model = AutoModelForCausalLM.from_pretrained(args.source).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.source)
    corpus = Corpus.from_file(args.corpus, tokenizer, args.max_len, args.text_field)
    inf = Influence(model, tokenizer, corpus)
    factors = Path(args.factors) if args.factors else None
    if factors is not None and (factors / "manifest.json").exists():
        inf.load_factors(factors)
    else:
        inf.fit(path=factors, cache=factors is None)
    return inf


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics (``%load_ext influence_nb``); a misused magic's :class:`MagicError`
    shows itself in one line."""
    ipython.register_magics(InfluenceMagics(ipython))
