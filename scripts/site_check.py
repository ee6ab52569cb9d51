"""Checks over the built documentation site (``mkdocs build`` output).

Static checks (no browser, run by ``tests/test_site.py`` in ``make test``):

* :func:`external_resources`: every script, stylesheet, font, image or frame that a page or
  a stylesheet loads is a file of the site, never another host (the site must work offline);
* :func:`missing_resources`: every such local file exists in the site.

Browser check (``make docs-check``, headless Chromium from Debian's ``chromium`` package):
:func:`browser_check` serves the site on 127.0.0.1, opens key pages at 1400 px, and asserts
that every formula was rendered by the bundled KaTeX (no raw ``\\(...\\)`` left, no
``katex-error``) and that every image and KaTeX font the page asked for was served (HTTP 200,
a real PNG/WOFF2 file). ``--screenshots DIR`` also writes one PNG per page at 1400 px wide.

    python scripts/site_check.py site [--screenshots shots/]
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

# (page path inside the site, what it shows): the pages a new user reads first.
KEY_PAGES = {
    "index.html": "home",
    "quickstart/index.html": "quick start",
    "concepts/tpa/index.html": "TPA",
    "concepts/ribbon-mask/index.html": "ribbon mask",
    "guides/trainer/index.html": "trainer guide",
    "results/index.html": "results",
    "comparison/index.html": "comparison",
    "models/index.html": "supported models",
}

# tag -> attributes whose URL the browser loads as part of the page (not links to follow).
_LOADED = {
    "script": ("src",),
    "img": ("src", "srcset"),
    "source": ("src", "srcset"),
    "iframe": ("src",),
    "video": ("src", "poster"),
    "audio": ("src",),
    "embed": ("src",),
    "object": ("data",),
}
# <link rel=...> values that make the browser fetch (or connect to) the URL.
_LINK_LOADS = {"stylesheet", "preload", "modulepreload", "prefetch", "preconnect", "dns-prefetch", "icon"}
_CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)['"]?\s*\)|@import\s+['"]([^'"]+)['"]""")


class _ResourceParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "link" and _LINK_LOADS & set(a.get("rel", "").lower().split()):
            self.urls.append(a.get("href", ""))
        for attr in _LOADED.get(tag, ()):
            if a.get(attr):
                if attr == "srcset":
                    self.urls += [part.strip().split()[0] for part in a[attr].split(",") if part.strip()]
                else:
                    self.urls.append(a[attr])
        if "style" in a:
            self.urls += css_urls(a["style"])
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.urls += css_urls(data)


def css_urls(css: str) -> list[str]:
    """The URLs a stylesheet loads (``url(...)`` and ``@import``)."""
    return [m.group(1) or m.group(2) for m in _CSS_URL.finditer(css)]


def html_resources(text: str) -> list[str]:
    """The URLs an HTML page loads by itself: scripts, stylesheets, images, frames, inline CSS."""
    parser = _ResourceParser()
    parser.feed(text)
    return [u for u in parser.urls if u]


def is_external(url: str) -> bool:
    """True when ``url`` names another host (``https://...``, ``//host/...``)."""
    parts = urlsplit(url)
    return bool(parts.netloc) or parts.scheme not in ("", "data")


def _resources(site: Path) -> Iterator[tuple[Path, str]]:
    for page in sorted(site.rglob("*.html")):
        for url in html_resources(page.read_text(encoding="utf-8")):
            yield page, url
    for sheet in sorted(site.rglob("*.css")):
        for url in css_urls(sheet.read_text(encoding="utf-8")):
            yield sheet, url


def external_resources(site: Path) -> list[tuple[str, str]]:
    """``(file, url)`` for every resource of the site loaded from another host."""
    return [(str(f.relative_to(site)), u) for f, u in _resources(site) if is_external(u)]


def missing_resources(site: Path) -> list[tuple[str, str]]:
    """``(file, url)`` for every local resource that is not a file of the site."""
    out = []
    for f, url in _resources(site):
        if is_external(url) or url.startswith(("data:", "#")):
            continue
        path = unquote(urlsplit(url).path)
        target = (f.parent / path).resolve() if not path.startswith("/") else site / path.lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            out.append((str(f.relative_to(site)), url))
    return out


# --- the browser check ----------------------------------------------------------------


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Server:
    """The site on 127.0.0.1 (a free port), recording every request's path and status."""

    def __init__(self, site: Path) -> None:
        self.requests: list[tuple[str, int]] = []
        log = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                log.append((unquote(urlsplit(self.path).path), int(code) if str(code).isdigit() else 0))

            def log_message(self, *args: object) -> None:  # keep the output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(site))
        )
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _chromium(binary: str, profile: Path, *args: str, height: int = 1800, timeout: float = 90) -> str:
    cmd = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
        # Every host but the local server is unreachable: a page that needs the network shows it.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--window-size=1400,{height}", "--virtual-time-budget=8000", *args,
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"chromium failed ({res.returncode}): {res.stderr[-2000:]}")
    return res.stdout


class _DomParser(html.parser.HTMLParser):
    """Counts formulas, rendered formulas, KaTeX errors and images of a rendered DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.formulas = 0
        self.errors = 0
        self.images: list[str] = []
        self._rendered: set[int] = set()  # formulas holding a .katex element
        self._stack: list[tuple[str, int]] = []  # (tag, formula number or -1 outside formulas)
        self._raw: list[str] = []

    @property
    def rendered(self) -> int:
        return len(self._rendered)

    def _inside(self) -> bool:
        return bool(self._stack) and self._stack[-1][1] >= 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = set((dict(attrs).get("class") or "").split())
        formula = self._stack[-1][1] if self._stack else -1
        if "arithmatex" in classes and formula < 0:
            formula = self.formulas
            self.formulas += 1
        if formula >= 0 and "katex" in classes:
            self._rendered.add(formula)
        if "katex-error" in classes:
            self.errors += 1
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        if tag not in ("img", "br", "hr", "input", "meta", "link", "col", "area", "wbr", "source"):
            self._stack.append((tag, formula))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                break

    def handle_data(self, data: str) -> None:
        if self._inside() and ("\\(" in data or "\\[" in data):
            self._raw.append(data.strip()[:80])


def browser_check(site: Path, screenshots: Path | None = None, screenshot_height: int = 4000) -> list[str]:
    """Problems found on the key pages in headless Chromium (empty list: all good)."""
    binary = find_chromium()
    if binary is None:
        return ["no Chromium found (make docs-check installs Debian's chromium package)"]
    problems: list[str] = []
    server = _Server(site)
    try:
        for page, name in KEY_PAGES.items():
            # A fresh profile per page: nothing comes from the cache, every request is seen.
            with tempfile.TemporaryDirectory() as tmp:
                profile = Path(tmp)
                if not (site / page).is_file():
                    problems.append(f"{name}: {page} is not in the site")
                    continue
                url = urljoin(server.base, page.removesuffix("index.html"))
                start = len(server.requests)
                dom = _DomParser()
                dom.feed(_chromium(binary, profile, "--dump-dom", url))
                served = server.requests[start:]
                if dom.formulas and dom.rendered < dom.formulas:
                    problems.append(f"{name}: {dom.rendered} of {dom.formulas} formulas rendered")
                if dom.errors:
                    problems.append(f"{name}: {dom.errors} KaTeX errors")
                if dom._raw:
                    problems.append(f"{name}: raw LaTeX left: {dom._raw[:3]}")
                failed = [(p, code) for p, code in served if code != 200]
                if failed:
                    problems.append(f"{name}: requests failed: {failed}")
                paths = {p for p, _ in served}
                page_dir = "/" + page.removesuffix("index.html")
                for src in dom.images:
                    want = unquote(urlsplit(urljoin(page_dir, src)).path)
                    if want not in paths:
                        problems.append(f"{name}: image {src} was never requested")
                    elif not _is_image(site / want.lstrip("/")):
                        problems.append(f"{name}: image {src} is not a PNG/JPEG/SVG file")
                if dom.formulas and not any(p.endswith(".woff2") for p in paths):
                    problems.append(f"{name}: formulas but no KaTeX font was loaded")
                print(f"{name:18} formulas {dom.rendered}/{dom.formulas}  images {len(dom.images)}  "
                      f"requests {len(served)}")  # fmt: skip
                if screenshots is not None:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    shot = screenshots / (page.replace("/index.html", "").replace("/", "_").replace(".html", "") + ".png")
                    _chromium(binary, profile, f"--screenshot={shot.resolve()}", url, height=screenshot_height)
    finally:
        server.close()
    return problems


def _is_image(path: Path) -> bool:
    if not path.is_file():
        return False
    head = path.read_bytes()[:8]
    return head.startswith((b"\x89PNG", b"\xff\xd8")) or path.suffix == ".svg"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("site", type=Path, help="the built site (mkdocs build -d DIR)")
    ap.add_argument("--screenshots", type=Path, default=None, help="write 1400 px screenshots here")
    ap.add_argument("--static-only", action="store_true", help="skip the browser check")
    args = ap.parse_args(argv)
    problems = [f"external resource in {f}: {u}" for f, u in external_resources(args.site)]
    problems += [f"missing resource in {f}: {u}" for f, u in missing_resources(args.site)]
    if not args.static_only:
        problems += browser_check(args.site, args.screenshots)
    for p in problems:
        print("FAIL", p, file=sys.stderr)
    print("site check:", "OK" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
