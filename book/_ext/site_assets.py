"""A local Sphinx extension of the book (``_config.yml``: ``sphinx.local_extensions``).

Every page of a Jupyter Book 1 build (jupyter-book 1.0.4, Sphinx 7.4, sphinx-thebe 0.3.1,
sphinx-togglebutton 0.3) lists two inline scripts twice: sphinx-thebe's
``const THEBE_JS_URL = ...`` and sphinx-togglebutton's ``var togglebuttonSelector = ...``.  The
second ``const`` declaration is a JavaScript error in the reader's console on every page
("Identifier 'THEBE_JS_URL' has already been declared").  This extension drops repeated
scripts (same file, or same inline body, and same attributes) from each page's script list,
keeping the first; tests/test_site.py opens every page in Chromium and fails on a console error.
"""
from __future__ import annotations


def _key(script) -> tuple:
    attributes = getattr(script, "attributes", {}) or {}
    # an inline script is registered with filename None and re-added by Sphinx 7.4's HTML builder
    # with filename "" (the cause of the repetition): both are the same script
    return (getattr(script, "filename", str(script)) or "",
            tuple(sorted((k, str(v)) for k, v in attributes.items() if k != "priority")))


def _drop_repeated_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        key = _key(script)
        if key not in seen:
            seen.add(key)
            kept.append(script)
    scripts[:] = kept  # the builder restores its own list after every page


def setup(app):
    # early (priority 100): Sphinx stops calling html-page-context handlers at the first one that
    # returns a template name; the repeated scripts are there before any handler runs
    app.connect("html-page-context", _drop_repeated_scripts, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
