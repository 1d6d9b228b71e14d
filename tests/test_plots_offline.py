"""`dvc plots show` / `dvc plots diff` pages render without network: .dvc/config points dvc at the committed
template (configs/plots/offline.html), which inlines vega, vega-lite and vega-embed at the versions dvc_render
would load from its CDN. The browser tests load real pages in headless Chromium with every host unresolvable."""
from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import sh
from dvc_render.html import HTML
from dvc_render.vega import VegaRenderer

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "configs" / "plots" / "offline.html"
PAGE = TEMPLATE.read_text(encoding="utf-8")
PINS = re.findall(r"cdn\.jsdelivr\.net/npm/([\w.-]+)@([\w.+-]+)", VegaRenderer.SCRIPTS)  # [(name, version)]
GLOBALS = {"vega": "vega", "vega-lite": "vegaLite", "vega-embed": "vegaEmbed"}  # what each UMD build defines


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text of each <script> (the parser ends one only at </script)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.styles: list[str] = []
        self.inside: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self.inside = tag
            if tag == "script":
                self.scripts.append((dict(attrs), ""))

    def handle_endtag(self, tag):
        if tag == self.inside:
            self.inside = None

    def handle_data(self, data):
        if self.inside == "script":
            self.scripts[-1] = (self.scripts[-1][0], self.scripts[-1][1] + data)
        elif self.inside == "style":
            self.styles.append(data)


def exported_version(code: str) -> str:
    """The version string a minified UMD build exports: `<ns>.version=<a>`, then `<a>=<b>` ... `<z>="x.y.z"`."""
    name = re.findall(r"[\w$]+\.version=([\w$]+)", code)[-1]  # the export block is at the end
    for _ in range(5):
        literal = re.search(rf'(?<![\w$.]){re.escape(name)}="([^"]+)"', code)
        if literal:
            return literal[1]
        name = re.search(rf"(?<![\w$.]){re.escape(name)}=([\w$]+)[,;]", code)[1]
    raise AssertionError(f"no string literal behind {name}")


def test_the_template_has_the_placeholders_dvc_fills_and_no_scripts_placeholder():
    assert PAGE.count("{plot_divs}") == 1
    assert PAGE.count("{refresh_tag}") == 1 and PAGE.index("{refresh_tag}") < PAGE.index("<script")  # in <head>
    assert "{scripts}" not in PAGE  # so dvc_render adds no CDN <script> tags
    page = HTML(PAGE, refresh_seconds=5).with_scripts(VegaRenderer.SCRIPTS).with_element("<p>PLOT</p>").embed()
    assert "cdn.jsdelivr.net/npm/vega" not in page.split("-->", 1)[1]  # only the comment names the CDN
    assert "<p>PLOT</p>" in page and '<meta http-equiv="refresh" content="5">' in page


def test_the_template_loads_nothing_from_the_network():
    tags = Tags(PAGE)
    assert [tag for tag, _ in tags.tags if tag == "script"] == ["script"] * len(PINS)
    for tag, attrs in tags.tags:
        assert "src" not in attrs or tag != "script", attrs
        for key in ("src", "href", "data", "srcset", "action", "poster"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//")), (tag, key, value)
        assert tag not in ("link", "iframe", "object", "embed", "base", "img"), tag
    assert not any(re.search(r"@import|url\(", style) for style in tags.styles)
    # the parser saw each library whole: no `</script` inside the code ended a block early
    assert all(len(code) > 50_000 for _, code in tags.scripts)
    assert all(code.rstrip().endswith(("}));", "}))")) for _, code in tags.scripts)


def test_the_template_inlines_the_versions_dvc_render_names():
    assert [name for name, _ in PINS] == list(GLOBALS)  # vega-lite and vega-embed need vega's global first
    scripts = Tags(PAGE).scripts
    assert [(attrs["data-package"], attrs["data-version"]) for attrs, _ in scripts] == PINS
    for (name, version), (_, code) in zip(PINS, scripts):
        assert f".{GLOBALS[name]}=" in code[:600], name  # the UMD header of that package
        assert exported_version(code) == version, name
        assert "sourceMappingURL" not in code
        assert f"{name}@{version}:" in PAGE.split("-->", 1)[0]  # the comment at the top says so too
    # the build script follows dvc_render too (it is what regenerates the page after an upgrade)
    spec = importlib.util.spec_from_file_location("build_template", TEMPLATE.parent / "build_template.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.pinned_packages() == PINS and build.OUT == TEMPLATE


def test_dvc_config_points_plots_at_the_template(monkeypatch):
    from dvc.cli import parse_args
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        configured = repo.config["plots"]["html_template"]
        assert (Path(repo.dvc_dir) / configured).resolve() == TEMPLATE
    monkeypatch.chdir(ROOT)
    args = parse_args(["plots", "show"])
    cmd = args.func(args)
    try:
        assert Path(cmd._html_template_path()).resolve() == TEMPLATE  # the path `dvc plots show` hands dvc_render
    finally:
        cmd.repo.close()


# ---------------------------------------------------------------------------------------------- in a browser

def chromium_path() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


browser = pytest.mark.skipif(chromium_path() is None,
                             reason="needs Chromium to load the pages (apt-get install chromium; CI installs it)")

# Runs first in <head>: records script errors, failed loads and unhandled promise rejections (vegaEmbed's).
CATCH = """<script>window.probeErrors = [];
addEventListener("error", function (e) {
  probeErrors.push(e.message || ("failed to load " + (e.target.src || e.target)));
}, true);
addEventListener("unhandledrejection", function (e) { probeErrors.push("rejected: " + e.reason); });</script>"""
# Runs after every plot's vegaEmbed call: per vega-embed container (by id), the pixels of its marks canvas that
# are neither blank nor white (-1: no canvas).
REPORT = """<script>setTimeout(function () {
  var painted = {};
  document.querySelectorAll(".vega-embed").forEach(function (el) {
    var c = el.querySelector("canvas.marks"), n = 0;
    if (c && c.width && c.height) {
      var d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      for (var i = 0; i < d.length; i += 4) {
        if (d[i + 3] > 0 && (d[i] < 200 || d[i + 1] < 200 || d[i + 2] < 200)) n++;
      }
    }
    painted[el.id] = c ? n : -1;
  });
  var g = function (name) { return window[name] ? window[name].version : null; };
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({errors: probeErrors, painted: painted,
    svg_marks: document.querySelectorAll("svg.marks").length,  // vega's other renderer: not used by dvc
    versions: {vega: g("vega"), "vega-lite": g("vegaLite"), "vega-embed": g("vegaEmbed")}});
  document.body.appendChild(pre);
}, 3000);</script>"""


def chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium with no network at all: every host name fails to resolve, so a CDN cannot answer."""
    cmd = [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
           "--hide-scrollbars", "--virtual-time-budget=8000", *extra, url]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
    return proc


def probe(index: Path, profile: Path) -> dict:
    """Load a copy of a dvc plots page with the two probe scripts added; what REPORT found."""
    page = index.read_text(encoding="utf-8")
    probed = index.with_name("probed.html")
    head, end = page.index("<head>") + len("<head>"), page.rindex("</body>")  # vega-embed's code has both too
    probed.write_text(page[:head] + CATCH + page[head:end] + REPORT + page[end:], encoding="utf-8")
    dom = chromium(probed.as_uri(), profile, "--dump-dom").stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
    assert found, f"the probe did not report:\n{dom[-2000:]}"
    report = json.loads(html.unescape(found[1]))
    report["plots"] = re.findall(r"vegaEmbed\('#([^']+)'", page)  # one call per plot in dvc's page, by div id
    return report


def png_rgb(path: Path) -> tuple[int, int, list[bytearray]]:
    """Width, height and RGB(A) rows of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, bytearray()
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(bytes(idat)), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            elif kind != 0:
                raise AssertionError(f"PNG filter {kind}")
        rows.append(line)
        prev = line
    if bpp == 4:
        for row in rows:
            del row[3::4]  # alpha
    return width, height, rows


def pixel_counts(png: Path) -> dict[str, int]:
    """Pixels of a screenshot: not white (anything drawn), dark (axes, ticks, labels), purple (dvc's first line)."""
    _, _, rows = png_rgb(png)
    counts = {"not_white": 0, "dark": 0, "purple": 0}
    for row in rows:
        for i in range(0, len(row), 3):
            r, g, b = row[i], row[i + 1], row[i + 2]
            counts["not_white"] += min(r, g, b) < 235
            counts["dark"] += max(r, g, b) < 110
            counts["purple"] += r - g > 40 and b - g > 60  # #945dd6, the first color of dvc's line template
    return counts


@pytest.fixture(scope="module")
def tiny_plots(tmp_path_factory) -> Path:
    """A fresh git + dvc repo with one plot of a small tsv."""
    repo = tmp_path_factory.mktemp("plots") / "repo"
    repo.mkdir()
    (repo / "loss.tsv").write_text("step\tloss\n" + "".join(f"{s}\t{4 / (1 + s / 5):.4f}\n" for s in range(40)))
    (repo / "dvc.yaml").write_text(
        "plots:\n  - loss:\n      title: offline render check\n      x: step\n      x_label: step\n"
        "      y_label: loss (nats)\n      y:\n        loss.tsv: loss\n")
    sh("git init -q && dvc init -q", repo)
    return repo


@pytest.mark.slow
@browser
def test_a_plot_renders_offline_with_the_template_and_not_without(tiny_plots, tmp_path):
    offline, default = tmp_path / "offline", tmp_path / "default"
    sh(f"dvc plots show --html-template {TEMPLATE} -o {offline}", tiny_plots)
    sh(f"dvc plots show -o {default}", tiny_plots)  # a fresh repo: no [plots] html_template, dvc's own page
    assert "<script src=" not in (offline / "index.html").read_text()
    assert '<script src="https://cdn.jsdelivr.net/npm/vega' in (default / "index.html").read_text()

    report = probe(offline / "index.html", tmp_path / "profile")
    assert report["errors"] == []
    assert report["plots"] == list(report["painted"]) == ["loss"]
    assert report["painted"]["loss"] > 2000, report  # the line, the axes and their labels
    assert report["versions"] == dict(PINS)  # what runs in the page is what dvc_render names

    shot = tmp_path / "offline.png"
    chromium((offline / "index.html").as_uri(), tmp_path / "profile", "--window-size=700,500", f"--screenshot={shot}")
    counts = pixel_counts(shot)
    assert counts["dark"] > 800 and counts["purple"] > 150 and counts["not_white"] > 3000, counts

    # dvc's own page: the libraries cannot load, so nothing is drawn, and vegaEmbed is not even defined
    report = probe(default / "index.html", tmp_path / "profile")
    assert report["plots"] == ["loss"] and report["painted"] == {} and report["svg_marks"] == 0, report
    assert any("vegaEmbed is not defined" in e for e in report["errors"]), report["errors"]
    assert report["versions"] == {name: None for name in GLOBALS}
    shot = tmp_path / "default.png"
    chromium((default / "index.html").as_uri(), tmp_path / "profile", "--window-size=700,500", f"--screenshot={shot}")
    assert pixel_counts(shot)["not_white"] < 100


@pytest.mark.slow
@browser
def test_every_plot_of_the_project_renders_offline(tiny_project, tmp_path):
    """The project's own dvc.yaml plots, over the files a `dvc repro` wrote (the git-ignored timing series too),
    through `dvc plots show` and .dvc/config alone."""
    out = tmp_path / "plots"
    sh(f"dvc plots show -o {out}", tiny_project)
    assert not (tiny_project / "dvc_plots").exists()
    page = (out / "index.html").read_text()
    assert page.startswith(TEMPLATE.read_text().split("{refresh_tag}")[0])  # .dvc/config picked the template
    report = probe(out / "index.html", tmp_path / "profile")
    assert report["errors"] == []
    assert report["plots"] and list(report["painted"]) == report["plots"], report
    # dvc writes `var spec = {};` for a plot whose files it could not read: nothing to draw, whatever the page
    no_data = re.findall(r"var spec = \{\};\s*vegaEmbed\('#([^']+)'", page)
    assert all(report["painted"][plot] > 2000 for plot in report["plots"] if plot not in no_data), report
    assert not no_data, f"dvc could not read these plots' files {no_data}"
