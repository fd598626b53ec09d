"""The book's execution-statistics table (``_config.yml``: ``sphinx.local_extensions``).

``{execution-statistics}`` in a page becomes, once every chapter has been read (and executed),
a table with one row per chapter: when it ran, how long it took, whether it succeeded, and
what it ran with (profile, models, device).

* When, how long, status: myst-nb's execution data (``make book`` executes every chapter
  itself), or else the papermill metadata stored in the notebook (the test suite executes the
  chapters under papermill and builds the book from them with execution off).
* Profile, models, device: the ``run_info`` value each chapter glues with
  ``sanitylib.book.record_run``, read from the glue file myst-nb writes next to the executed
  notebook (``_build/jupyter_execute/<chapter>.glue.json``).

A chapter that recorded nothing shows "not recorded"; the table never invents a value.
Works like myst-nb's own ``{nb-exec-table}`` (a placeholder node replaced in a post-transform,
the page re-rendered when a chapter is re-executed).
"""
from __future__ import annotations

import ast
import json
import posixpath
from datetime import datetime, timezone
from pathlib import Path

import nbformat
from docutils import nodes
from sphinx.addnodes import pending_xref
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util.docutils import SphinxDirective

RUN_INFO_KEY = "run_info"  # sanitylib.book.runinfo.RUN_INFO_KEY (not imported: Sphinx side)
_FLAG = "has_execution_statistics"
HEADERS = ("Chapter", "Ran at (UTC)", "Run time", "Status", "Profile", "Models", "Device")


class ExecutionStatisticsNode(nodes.General, nodes.Element):
    """Placeholder, replaced by the table once every document has been read."""


class ExecutionStatistics(SphinxDirective):
    has_content = False

    def run(self):
        self.env.metadata[self.env.docname][_FLAG] = True
        return [ExecutionStatisticsNode()]


def _fmt_seconds(seconds) -> str:
    if seconds is None:
        return "–"
    seconds = float(seconds)
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _papermill(path: Path) -> dict | None:
    """When/how long/status from the papermill metadata of an executed notebook, if any."""
    try:
        meta = nbformat.read(path, as_version=4).metadata.get("papermill", {})
    except Exception:  # noqa: BLE001 - a notebook that cannot be read has no statistics
        return None
    if not meta.get("duration"):
        return None
    start = meta.get("start_time")
    when = None
    if start:
        when = datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp()
    return {"mtime": when, "runtime": meta["duration"], "succeeded": meta.get("exception") is None,
            "method": "papermill"}


def _run_info(outdir: Path, docname: str) -> dict | None:
    glue_file = Path(outdir).parent / "jupyter_execute" / f"{docname}.glue.json"
    if not glue_file.exists():
        return None
    data = json.loads(glue_file.read_text()).get(RUN_INFO_KEY)
    if not data:
        return None
    text = data.get("data", {}).get("text/plain")
    try:
        return json.loads(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError):
        return None


def statistics(env, outdir: Path) -> list[dict]:
    """One dict per executed chapter, in table-of-contents order."""
    order = {doc: i for i, doc in enumerate(_toc_order(env))}
    rows = []
    for docname in sorted(env.found_docs, key=lambda d: (order.get(d, len(order)), d)):
        source = Path(env.doc2path(docname))
        if source.suffix != ".ipynb":
            continue
        nb_meta = getattr(env, "nb_metadata", {}).get(docname, {})
        exec_data = nb_meta.get("exec_data") or _papermill(source)
        info = _run_info(outdir, docname) or {}
        title = env.titles.get(docname)
        rows.append({
            "docname": docname, "title": title.astext() if title is not None else docname,
            "ran_at": (datetime.fromtimestamp(exec_data["mtime"], timezone.utc).strftime("%Y-%m-%d %H:%M")
                       if exec_data and exec_data.get("mtime") else "–"),
            "runtime": _fmt_seconds(exec_data.get("runtime") if exec_data else None),
            "status": ("–" if not exec_data else "succeeded" if exec_data.get("succeeded") else "failed"),
            "profile": info.get("profile", "not recorded"),
            "models": ", ".join(info.get("models", [])) or "not recorded",
            "device": info.get("device", "not recorded"),
        })
    return rows


def _toc_order(env) -> list[str]:
    """Documents in reading order (the toctree walked from the root document)."""
    seen: list[str] = []

    def walk(doc):
        if doc in seen:
            return
        seen.append(doc)
        for child in env.toctree_includes.get(doc, []):
            walk(child)

    walk(env.config.root_doc)
    return seen


def _table(parent: str, rows: list[dict]) -> nodes.table:
    table = nodes.table(classes=["colwidths-auto", "execution-statistics"])
    group = nodes.tgroup(cols=len(HEADERS))
    table += group
    for _ in HEADERS:
        group += nodes.colspec(colwidth=1)
    head = nodes.thead()
    group += head
    row = nodes.row()
    head += row
    for h in HEADERS:
        row += nodes.entry("", nodes.paragraph(text=h))
    body = nodes.tbody()
    group += body
    for r in rows:
        row = nodes.row()
        body += row
        link = pending_xref(refdoc=parent, reftype="doc", refdomain="std", refexplicit=True,
                            reftarget="/" + r["docname"], refwarn=True, classes=["xref", "doc"])
        link += nodes.inline(text=r["title"])
        para = nodes.paragraph()
        para += link
        row += nodes.entry("", para)
        for key in ("ran_at", "runtime", "status", "profile", "models", "device"):
            row += nodes.entry("", nodes.paragraph(text=r[key]))
    return table


class ExecutionStatisticsTransform(SphinxPostTransform):
    default_priority = 8  # before the reference resolvers (the links are pending_xref)

    def run(self, **kwargs) -> None:
        for node in list(self.document.findall(ExecutionStatisticsNode)):
            node.replace_self(_table(self.env.docname, statistics(self.env, Path(self.app.outdir))))


def _pages_with_table(app, env):
    """Re-render the page when any chapter was re-read (its statistics changed)."""
    return [doc for doc, meta in env.metadata.items() if meta.get(_FLAG)]


def setup(app):
    app.add_node(ExecutionStatisticsNode)
    app.add_directive("execution-statistics", ExecutionStatistics)
    app.add_post_transform(ExecutionStatisticsTransform)
    app.connect("env-updated", _pages_with_table)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
