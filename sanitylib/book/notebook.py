"""Glue a chapter's values into its text: myst-nb inside a book build, a plain display elsewhere.

The chapters glue numbers, sentences and figures by name (``glue("ch02_gbp_abs", value)``) and
the book's Markdown pastes them (``{glue:text}`ch02_gbp_abs`:.2f``).  :func:`glue` calls
:func:`myst_nb.glue` when myst-nb is importable (the book build, the test suite's main
environment).  Elsewhere (Colab, plain Jupyter, VS Code, papermill with only the package
installed) the ``{glue}`` roles are not rendered, so the value is *shown* instead, as one
display output that a frontend can render (no output with only a machine-readable MIME type,
which some frontends report as "no renderer"):

* a figure as the figure itself, a Markdown value as Markdown;
* any other value as ``name = value`` (HTML), with the value's own ``text/plain`` kept.

That output carries the same ``scrapbook`` metadata as ``myst_nb.glue(name, value,
display=True)``, so the executed notebook can still be read by papermill/scrapbook tools and
built into the book by myst-nb.  Outside IPython (a plain ``python`` script) the line
``name = value`` is printed.

:func:`styled` is how a chapter shows a table: formatted numbers, and no column of row numbers
(a pandas ``RangeIndex``) in the rendered page.
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["glue", "have_myst_nb", "styled"]

#: The MIME prefix myst-nb gives values glued with ``display=False``.
GLUE_PREFIX = "application/papermill.record/"
_SHORT = 200  # characters of a value's text shown by the fallback


def _myst_glue():
    """``myst_nb.glue``, or ``None`` when myst-nb is not installed."""
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return None
    return myst_glue


def have_myst_nb() -> bool:
    """Whether :func:`glue` goes through myst-nb in this environment."""
    return _myst_glue() is not None


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _SHORT else text[: _SHORT - 1] + "…"


def _shell():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def glue(name: str, value: Any, display: bool = False) -> None:
    """Glue ``value`` under ``name`` for the book's Markdown (``{glue:text}``, ``{glue:md}``,
    ``{glue:figure}``).

    With myst-nb installed this is ``myst_nb.glue(name, value, display=display)``: the book
    pastes the value where its text names it, and ``display=False`` hides it in the cell's
    output.  Without myst-nb the value is shown in the cell's output (see the module
    docstring), whatever ``display`` says: nothing else would show it.
    """
    myst_glue = _myst_glue()
    if myst_glue is not None:
        myst_glue(name, value, display=display)
        return
    shell = _shell()
    if shell is None:
        print(f"{name} = {_short(_text_of(value))}")
        return
    from IPython.core.formatters import format_display_data
    from IPython.display import display as ipy_display

    bundle, metadata = format_display_data(value)
    bundle, metadata = dict(bundle), dict(metadata)
    shows_itself = hasattr(value, "savefig") or any(k.startswith("image/") or k == "text/html"
                                                     for k in bundle)  # fmt: skip
    if not shows_itself:
        label = _short(bundle.get("text/markdown", bundle.get("text/plain", "")))
        bundle["text/html"] = f"<code>{html.escape(name)}</code> = {html.escape(label)}"
    metadata["scrapbook"] = {"name": name, "mime_prefix": ""}
    ipy_display(bundle, raw=True, metadata=metadata)


def _text_of(value: Any) -> str:
    data = getattr(value, "data", None)  # IPython.display.Markdown and friends
    return data if isinstance(data, str) else repr(value)


def styled(df, precision: int = 2, na_rep: str = ""):
    """``df`` as a chapter shows it: a :class:`pandas.io.formats.style.Styler` with numbers at
    ``precision`` decimals and missing values as ``na_rep``; the index is hidden when it only
    numbers the rows (a default ``RangeIndex``, which would render as a column 0, 1, 2, ...
    without meaning), and kept when it names them (methods, stages, ...)."""
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if isinstance(precision, bool) or not isinstance(precision, int) or precision < 0:
        raise ValueError(f"precision must be a non-negative int, got {precision!r}")
    style = df.style.format(precision=precision, na_rep=na_rep)
    index = df.index
    if isinstance(index, pd.RangeIndex) and index.name is None:
        style = style.hide(axis="index")
    return style
