"""The built book as a reader gets it: a web site, opened in a real browser.

The site is the one this test session builds strictly from the smoke-executed chapters (the
``built_book`` fixture of conftest.py, shared with tests/test_notebooks.py), or, to check a site
built elsewhere (``make book``), the folder named by ``SANITYLIB_TEST_SITE`` (e.g.
``SANITYLIB_TEST_SITE=_build/html pytest tests/test_site.py``).

Two kinds of checks:

* over the HTML files (no browser): no page loads a script or a stylesheet from another host
  (the site is complete on disk: MathJax comes from ``_static/mathjax``), every internal link
  resolves to a file and an anchor of the site;
* in headless Chromium (Debian's ``chromium``, driven by Playwright, which never downloads a
  browser here), served by a local HTTP server on 127.0.0.1 with every other request refused:
  every page opens without console errors or blocked requests, every image loads, MathJax
  typesets every equation, the text has no unrendered roles (``{glue``, ``{doc}``), the
  chapters' outputs show no download chatter or home-directory paths and no pandas index column,
  every exercise has a collapsed solution dropdown, every chapter has a Colab launch button for
  its own notebook.  A screenshot of each chapter's first figure is kept under
  ``_build/site-screenshots/`` (CI artifacts).

Without Chromium or Playwright the browser checks are skipped with the reason (``.ci/run``
installs Chromium; Playwright is in the ``test`` extra).
"""
from __future__ import annotations

import functools
import html.parser
import http.server
import os
import re
import shutil
import threading
import urllib.parse
from pathlib import Path

import pandas as pd
import pytest
import yaml

try:  # the `test` extra; without it the browser checks are skipped with the reason
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright
except ImportError:
    PlaywrightTimeout, sync_playwright = TimeoutError, None

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "_build" / "site-screenshots"
_REPO = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
#: Where the Colab button of chapter <stem> must point (the book's repository and branch).
COLAB = (f"https://colab.research.google.com/github/"
         f"{_REPO['url'].removeprefix('https://github.com/').strip('/')}/blob/{_REPO['branch']}/"
         "notebooks/{stem}.ipynb")
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
#: The chapters with exercises (an ``{exercise}`` box in the notebook's Markdown).
WITH_EXERCISES = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")
                        if "```{exercise}" in p.read_text(encoding="utf-8"))  # fmt: skip
#: Chromium's flags: headless, as root (CI), and nothing that reaches the network on its own;
#: DNS answers only for 127.0.0.1, as a second fence behind the request filter.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # fmt: skip
#: Home-directory paths in a chapter's output (the test machine's own home as well).
HOME_PATH = re.compile(r"(?<![\w.])(/root/|/home/[\w.-]+/|/Users/[\w.-]+/|[A-Z]:\\Users\\)")
#: Text of a role that Sphinx did not render.
UNRENDERED = ("{glue", "{doc}", "{ref}", "{cite", "{numref}", "{eq}")


def slow(test):
    """A test that needs the built book: the first one builds it (every chapter executed, then
    the strict build: longer than the suite's per-test timeout on a busy machine)."""
    return pytest.mark.slow(pytest.mark.timeout(2700)(test))


def _chromium() -> str | None:
    path = os.environ.get("SANITYLIB_CHROMIUM") or shutil.which("chromium")
    return path if path and Path(path).exists() else None


@pytest.fixture(scope="module")
def site(request) -> Path:
    """The HTML folder of the book (built by this session unless SANITYLIB_TEST_SITE names one)."""
    given = os.environ.get("SANITYLIB_TEST_SITE")
    if given:
        path = Path(given).resolve()
        if not (path / "index.html").exists():
            raise FileNotFoundError(f"SANITYLIB_TEST_SITE={given}: no index.html there")
        return path
    return request.getfixturevalue("built_book")


def _pages(site: Path) -> list[Path]:
    """Every page of the site (the theme's and Sphinx's own files excluded)."""
    return sorted(p for p in site.rglob("*.html")
                  if not p.relative_to(site).parts[0].startswith("_"))  # fmt: skip


# ------------------------------------------------------------------------------- HTML checks


class _Links(html.parser.HTMLParser):
    """What a page loads (scripts, stylesheets, other <link>s, images) and where it links to,
    and the ids it defines."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.loads: list[tuple[str, str]] = []  # (what, url)
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "script" and a.get("src"):
            self.loads.append(("script", a["src"]))
        elif tag == "link" and a.get("href"):
            rel = (a.get("rel") or "").lower()
            if rel in ("stylesheet", "preload", "modulepreload", "prefetch", "icon",
                       "shortcut icon") or "stylesheet" in rel:  # fmt: skip
                self.loads.append((f"link rel={rel}", a["href"]))
        elif tag in ("img", "iframe", "source", "embed") and a.get("src"):
            self.loads.append((tag, a["src"]))
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _external(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return bool(parts.netloc) or parts.scheme not in ("", "file")


@slow
def test_no_page_loads_anything_from_another_host(site):
    """The site is complete on disk: no script, stylesheet, font, icon or image from a CDN or
    any other host, in any page or in the stylesheets of _static (@import, url())."""
    bad = [f"{p.relative_to(site)}: {what} {url}" for p in _pages(site)
           for what, url in _parse(p).loads if _external(url)]  # fmt: skip
    css_url = re.compile(r"(?:@import\s+|url\()\s*['\"]?((?:https?:)?//[^'\")\s]+)")
    for css in site.glob("_static/**/*.css"):
        bad += [f"{css.relative_to(site)}: {u}" for u in css_url.findall(css.read_text(errors="replace"))]
    assert not bad, "loaded from another host:\n" + "\n".join(bad)
    # MathJax is served from the site itself (sphinx-mathjax-offline, _config.yml)
    mathjax = [url for p in _pages(site) for what, url in _parse(p).loads if "mathjax" in url.lower()]
    assert mathjax, "no page loads MathJax"
    for p in _pages(site):
        for what, url in _parse(p).loads:
            if "mathjax" in url.lower():
                target = (p.parent / urllib.parse.urlsplit(url).path).resolve()
                assert target.is_file() and target.is_relative_to(site), (p, url)


@slow
def test_internal_links_resolve(site):
    """Every link from one page of the site to another (or within a page) names a file of the
    site and, with a #fragment, an id on that page."""
    broken = []
    for page in _pages(site):
        for href in _parse(page).links:
            parts = urllib.parse.urlsplit(href)
            if _external(href) or parts.scheme == "mailto":
                continue
            target = page if not parts.path else (page.parent / urllib.parse.unquote(parts.path))
            target = target.resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file() or not target.is_relative_to(site):
                broken.append(f"{page.relative_to(site)}: {href} (no such file)")
            elif parts.fragment and target.suffix == ".html":
                if urllib.parse.unquote(parts.fragment) not in _parse(target).ids:
                    broken.append(f"{page.relative_to(site)}: {href} (no such anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(sorted(set(broken)))


@slow
def test_landing_page_lists_the_chapters_without_status_words(site):
    """The chapter list of the landing page names the chapters, not a status after each one
    ("(available)" after every chapter said nothing)."""
    text = (site / "book" / "intro.html").read_text(encoding="utf-8")
    assert "(available)" not in text


def test_styled_table_hides_a_row_number_index_and_keeps_a_named_one():
    """sanitylib.book.styled: what the chapters show a table with.  A RangeIndex (row numbers)
    is not a column of the rendered table; an index that names the rows is."""
    from sanitylib.book import styled

    numbered = pd.DataFrame({"method": ["Gradient", "SmoothGrad"], "value": [0.123456, 0.5]})
    out = styled(numbered).to_html()
    assert "row_heading" not in out and "0.12" in out and "0.123456" not in out
    named = numbered.set_index("method")
    assert "row_heading" in styled(named, precision=3).to_html()
    assert "0.123" in styled(named, precision=3).to_html()
    with pytest.raises(ValueError, match="df"):
        styled(numbered.to_dict())
    with pytest.raises(ValueError, match="precision"):
        styled(numbered, precision=-1)


# ---------------------------------------------------------------------------- browser checks


@pytest.fixture(scope="module")
def server(site):
    """``site`` served over HTTP on 127.0.0.1 (an ephemeral port), stopped after the module."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        timeout = 30  # a stuck connection cannot hold the server

        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                              daemon=True)  # fmt: skip
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium (Debian's) in a fresh profile, driven by Playwright; every request that
    is not for 127.0.0.1 is refused and recorded in ``context.blocked``."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run "
                    "installs it; or set SANITYLIB_CHROMIUM to a Chromium binary)")
    if sync_playwright is None:
        pytest.skip("Playwright is not installed (it is in the `test` extra: "
                    "pip install -e '.[test]')")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900}, service_workers="block")
        context.blocked = []

        def only_local(route):
            host = urllib.parse.urlsplit(route.request.url).hostname
            if host == "127.0.0.1" or route.request.url.startswith(("data:", "blob:")):
                route.continue_()
            else:
                context.blocked.append(route.request.url)
                route.abort("internetdisconnected")

        context.route("**/*", only_local)
        context.set_default_timeout(60_000)
        try:
            yield context
        finally:
            context.close()


#: Run in each page once it has loaded: every image loaded, MathJax done, and what the checks
#: read from the DOM.
_INSPECT = r"""
async () => {
  // images: load the lazy ones too, then wait for every image to settle
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = "eager"; });
  await Promise.all(imgs.map(i => i.complete ? null :
      new Promise(r => { i.addEventListener("load", r); i.addEventListener("error", r); })));
  // MathJax (typesets after the page's load event)
  let mathjax = null;
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
    mathjax = MathJax.version || "loaded";
  }
  const main = document.querySelector("main") || document.body;
  const textOf = el => {   // the visible text without code cells' sources
    const clone = el.cloneNode(true);
    clone.querySelectorAll("pre, script, style, mjx-container, .MathJax").forEach(n => n.remove());
    return clone.innerText;
  };
  const outputs = [...document.querySelectorAll(".cell_output")]
      .map(o => o.innerText);
  const tables = [...main.querySelectorAll(".cell_output table")].map(t => {
    const first = r => { const c = r.firstElementChild;
                         return c ? [c.tagName, c.innerText.trim()] : ["", ""]; };
    return {head: [...t.querySelectorAll("thead tr")].map(first),
            body: [...t.querySelectorAll("tbody tr")].map(first)};
  });
  // exercises and solutions in document order: each exercise's solution follows it
  // (exercise_style: solution_follow_exercise) before the next exercise
  const boxes = [...document.querySelectorAll("div.exercise, div.solution")].map(b => {
    if (b.classList.contains("exercise")) return {kind: "exercise", id: b.id};
    const body = b.querySelector("section") || b.children[1];
    return {kind: "solution", id: b.id, dropdown: b.classList.contains("dropdown"),
            hidden: !body || getComputedStyle(body).visibility === "hidden" ||
                    body.getBoundingClientRect().height === 0,
            toggle: !!b.querySelector(".toggle-button")};
  });
  return {
    images: imgs.map(i => ({src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0})),
    mathjax,
    mathSource: document.querySelectorAll(".math, span.math, div.math").length,
    mathTypeset: document.querySelectorAll("mjx-container").length,
    text: textOf(main),
    outputs, tables, boxes,
    colab: [...document.querySelectorAll("a[href*='colab.research.google.com']")]
        .map(a => ({href: a.href, button: !!a.closest(".dropdown-launch-buttons")})),
  };
}
"""


@pytest.fixture(scope="module")
def opened(site, server, browser) -> dict[str, dict]:
    """Every page opened in the browser once: ``{relative path: what _INSPECT read, plus the
    console errors, page errors, failed and blocked requests}``; the first figure of each
    chapter is saved as a screenshot under _build/site-screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()
    result = {}
    for path in _pages(site):
        rel = path.relative_to(site).as_posix()
        page = browser.new_page()
        errors, failed = [], []
        page.on("console", lambda m, e=errors: e.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc, e=errors: e.append(f"uncaught: {exc}"))
        page.on("requestfailed", lambda r, f=failed: f.append(f"{r.url} ({r.failure})"))
        n_blocked = len(browser.blocked)
        page.goto(f"{server}/{rel}", wait_until="load")
        redirect = _REDIRECT.search(path.read_text(encoding="utf-8")[:500])
        if redirect:  # the root index.html only sends the reader on: follow it
            page.wait_for_url(urllib.parse.urljoin(f"{server}/{rel}", redirect.group(1)))
            page.wait_for_load_state("load")
        info = page.evaluate(_INSPECT)
        try:  # nothing left loading (late requests are seen by the handlers above)
            page.wait_for_load_state("networkidle", timeout=30_000)
        except PlaywrightTimeout:
            failed.append("the page kept loading for 30 s after its load event")
        info.update(errors=errors, failed=failed, blocked=browser.blocked[n_blocked:])
        if rel.startswith("notebooks/"):
            figure = page.locator("main figure img, main .cell_output img").first
            if figure.count():
                figure.scroll_into_view_if_needed()
                figure.screenshot(path=str(SCREENSHOTS / f"{path.stem}.png"))
                info["screenshot"] = str(SCREENSHOTS / f"{path.stem}.png")
            toggle = page.locator("div.solution .toggle-button").first
            if toggle.count():  # a solution opens when its button is clicked
                toggle.click()
                info["solution_opens"] = page.locator("div.solution section").first.is_visible()
        page.close()
        result[rel] = info
    return result


_REDIRECT = re.compile(r'<meta http-equiv="Refresh" content="0; url=([^"]+)"', re.I)


def _chapters(opened: dict) -> list[str]:
    """The chapters to check: every notebook of the repository in a site this session built;
    in a site named by SANITYLIB_TEST_SITE (perhaps a partial build), the chapters it has."""
    if os.environ.get("SANITYLIB_TEST_SITE"):
        return [c for c in CHAPTERS if f"notebooks/{c}.html" in opened]
    return CHAPTERS


def _report(problems: dict[str, list]) -> str:
    return "\n".join(f"{page}: {p}" for page, ps in problems.items() for p in ps)


@slow
def test_every_page_opens_without_errors_or_network(opened):
    """No console error, no uncaught exception, no failed request, and no attempt to reach
    another host, on any page."""
    assert _chapters(opened)
    problems = {page: info["errors"] + info["failed"] + [f"blocked: {u}" for u in info["blocked"]]
                for page, info in opened.items()}  # fmt: skip
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, _report(problems)


@slow
def test_every_image_loads(opened):
    problems = {page: [f"image not loaded: {i['src']}" for i in info["images"] if not i["ok"]]
                for page, info in opened.items()}  # fmt: skip
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, _report(problems)
    for stem in _chapters(opened):
        shot = opened[f"notebooks/{stem}.html"].get("screenshot")
        assert shot and Path(shot).stat().st_size > 0, f"{stem}: no figure to screenshot"


@slow
def test_equations_are_typeset_offline(opened):
    """MathJax (served by the site itself, every other host refused) typesets every equation:
    its output elements are there and no raw TeX delimiter is left in the visible text."""
    with_math = {page: info for page, info in opened.items() if info["mathSource"]}
    assert "book/methods_and_metrics.html" in with_math  # the page of formulas
    assert "notebooks/07_why_methods_pass.html" in with_math
    problems = {}
    for page, info in opened.items():
        p = []
        if page in with_math and not info["mathjax"]:
            p.append("MathJax did not load")
        elif page in with_math and info["mathTypeset"] < info["mathSource"]:
            p.append(f"{info['mathTypeset']} typeset of {info['mathSource']} equations")
        for raw in ("\\(", "\\)", "\\[", "$$"):
            if raw in info["text"]:
                at = info["text"].index(raw)
                p.append(f"raw {raw!r} in the text: ...{info['text'][max(0, at - 60):at + 60]!r}")
        if p:
            problems[page] = p
    assert not problems, _report(problems)


@slow
def test_no_unrendered_roles_in_the_text(opened):
    problems = {}
    for page, info in opened.items():
        for role in UNRENDERED:
            for m in re.finditer(re.escape(role), info["text"]):
                problems.setdefault(page, []).append(
                    repr(info["text"][max(0, m.start() - 60):m.start() + 80]))
    assert not problems, _report(problems)


@slow
def test_chapter_outputs_show_no_download_chatter_or_home_paths(opened):
    problems = {}
    for page, info in opened.items():
        for out in info["outputs"]:
            for line in out.splitlines():
                if line.lstrip().startswith("Downloading") or HOME_PATH.search(line) or \
                        str(Path.home()) + os.sep in line:  # fmt: skip
                    problems.setdefault(page, []).append(repr(line[:200]))
    assert not problems, _report(problems)


def _row_number_index(table: dict) -> bool:
    """Whether a rendered table's first column is an unnamed pandas index of row numbers: its
    body rows start with header cells holding integers (0, 1, 2, ... or what is left of them
    after a filter) and no header row names that column."""
    body, head = table["body"], table["head"]
    if not body or any(tag != "TH" or not re.fullmatch(r"-?\d+", text) for tag, text in body):
        return False
    return not any(tag == "TH" and text for tag, text in head)


def test_row_number_index_detection():
    def t(body, head=(("TH", ""), )):
        return {"body": [list(r) for r in body], "head": [list(r) for r in head]}

    assert _row_number_index(t([("TH", "0"), ("TH", "1"), ("TH", "2")]))
    assert _row_number_index(t([("TH", "3"), ("TH", "17")]))  # rows left after a filter
    assert not _row_number_index(t([("TD", "0"), ("TD", "1")]))  # a data column
    assert not _row_number_index(t([("TH", "Gradient"), ("TH", "SmoothGrad")]))  # named rows
    assert not _row_number_index(t([("TH", "1"), ("TH", "2")], [("TH", ""), ("TH", "epoch")]))
    assert not _row_number_index(t([]))


@slow
def test_tables_show_no_pandas_index_column(opened):
    problems = {}
    for page, info in opened.items():
        for k, table in enumerate(info["tables"]):
            if _row_number_index(table):
                numbers = ", ".join(text for _, text in table["body"][:5])
                problems.setdefault(page, []).append(
                    f"table {k + 1} of the page's outputs shows a pandas index ({numbers}, ...)")
    assert not problems, _report(problems)


@slow
def test_every_exercise_has_a_collapsed_solution_dropdown(opened):
    """Each exercise box is followed, before the next exercise, by its solution: a dropdown
    with its toggle button, closed when the page opens."""
    problems = {}
    assert len(WITH_EXERCISES) >= len(CHAPTERS) - 1  # every chapter but the capstone
    for stem in [c for c in _chapters(opened) if c in WITH_EXERCISES]:
        page = f"notebooks/{stem}.html"
        boxes = opened[page]["boxes"]
        exercises = [k for k, b in enumerate(boxes) if b["kind"] == "exercise"]
        if not exercises:
            problems[page] = ["no exercise"]
        for n, k in enumerate(exercises):
            end = exercises[n + 1] if n + 1 < len(exercises) else len(boxes)
            sols = [b for b in boxes[k + 1:end] if b["kind"] == "solution"]
            ex = boxes[k]["id"]
            if not sols:
                problems.setdefault(page, []).append(f"exercise {ex}: no solution")
            for b in sols:
                if not (b["dropdown"] and b["toggle"] and b["hidden"]):
                    problems.setdefault(page, []).append(
                        f"exercise {ex}: solution {b['id']} is not a collapsed dropdown ({b})")
        if exercises and not opened[page].get("solution_opens"):
            problems.setdefault(page, []).append("the first solution does not open on a click")
    assert not problems, _report(problems)


@slow
def test_every_chapter_has_a_colab_button_for_its_own_notebook(opened):
    problems = {}
    for stem in _chapters(opened):
        info = opened[f"notebooks/{stem}.html"]
        want = COLAB.format(stem=stem)
        if not any(c["href"] == want and c["button"] for c in info["colab"]):
            problems[f"notebooks/{stem}.html"] = [f"no launch button for {want}: {info['colab']}"]
    assert not problems, _report(problems)
