"""tt.report for images, text and table rows: escaped user strings, images that decode.

The browser check runs Debian's ``chromium`` headless when ``/usr/bin/chromium`` exists (install
it with ``apt-get install chromium``); otherwise it is skipped with that message.
"""

from __future__ import annotations

import html as html_module
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.interfaces.report import CSP, Card, HTMLReport, Markup

HOSTILE = "<script>document.title='PWNED'</script><img src=x onerror=\"document.title='PWNED'\">"
CHROMIUM = "/usr/bin/chromium"


class _Elements(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _assert_inert(page: str) -> list[tuple[str, dict]]:
    """No script element, no event-handler attribute, no external reference; returns tags."""
    parser = _Elements()
    parser.feed(page)
    assert not [t for t, _ in parser.tags if t in ("script", "iframe", "object", "embed")]
    assert not [(t, a) for t, a in parser.tags if any(k.startswith("on") for k in a)]
    for tag, attrs in parser.tags:
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith("data:image/"), (tag, attrs)
    assert f'content="{CSP}"' in page
    return parser.tags


def _top(n_query: int, n_train: int, k: int) -> tt.TopK:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(n_query, n_train, generator=g)
    pro = torch.topk(scores, k, dim=1)
    opp = torch.topk(scores, k, dim=1, largest=False)
    return tt.TopK(tt.Ranking(pro.indices, pro.values), tt.Ranking(opp.indices, opp.values))


def _image_data():
    """Training images as [1, 8, 8] tensors, [3, 8, 8] tensors, HxWx3 uint8 arrays, PIL."""
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    train = [(torch.rand(1, 8, 8, generator=g), i % 3) for i in range(6)]
    train += [(torch.rand(3, 8, 8, generator=g), 1) for _ in range(3)]
    train += [(np.full((8, 8, 3), 200, dtype=np.uint8), 2)]
    train += [(Image.new("RGB", (8, 8), (255, 0, 0)), 0), (torch.zeros(8, 8), 1)]  # constant
    queries = TensorDataset(torch.rand(2, 1, 8, 8, generator=g), torch.tensor([0, 2]))
    return train, queries


def _text_data():
    train = [{"text": f"example {i} {HOSTILE}", "label": i % 2} for i in range(8)]
    queries = [{"text": "query <b>bold?</b>", "label": 1}]
    return train, queries


def _write(kind: str, path: Path) -> Path:
    if kind == "image":
        train, queries = _image_data()
        kw = {}
    elif kind == "text":
        train, queries = _text_data()
        kw = {"text": "text"}
    else:
        x = torch.randn(8, 12)
        train = TensorDataset(x, torch.arange(8) % 2)
        queries = TensorDataset(x[:2], torch.tensor([0, 1]))
        kw = {}
    n = len(train)
    flipped = np.zeros(n, dtype=bool)
    flipped[[1, 4]] = True
    return tt.report(
        path,
        train=train,
        queries=queries,
        top=_top(len(queries), n, 3),
        self_influence=torch.linspace(1, 0, n),
        flipped=flipped,
        baselines={"loss " + HOSTILE: np.arange(n)[::-1].astype(float)},
        evaluation={HOSTILE: {"AUROC": 0.9, "note": HOSTILE}},
        label_names=[HOSTILE, "one", "two"],
        query_captions=[[HOSTILE]] * len(queries),
        title="report " + HOSTILE,
        explains="the loss " + HOSTILE,
        top_self_influence=5,
        **kw,
    )


@pytest.mark.parametrize("kind", ["image", "text", "table"])
def test_report_escapes_every_user_string(tmp_path, kind):
    page = _write(kind, tmp_path / f"{kind}.html").read_text()
    tags = _assert_inert(page)
    assert "PWNED" in page  # the hostile text is shown ... as text
    assert "&lt;script&gt;" in page
    n_img = sum(t == "img" for t, _ in tags)
    if kind == "image":
        # 2 queries × (1 + 3 + 3) cards + 5 self-influence cards + the mislabel curve
        assert n_img == 2 * 7 + 5 + 1
    else:
        assert n_img == 1  # only the curve
    assert "Finding the mislabeled training examples" in page and "Evaluation" in page


def test_gallery_labels_and_captions_are_escaped():
    rep = HTMLReport("t")
    rep.gallery([(HOSTILE, [Card(HOSTILE, [HOSTILE, Markup("<b>ok</b>")])])], title=HOSTILE)
    page = rep.render()
    _assert_inert(page)
    assert "<b>ok</b>" in page  # Markup passes through


def test_report_input_errors(tmp_path):
    train, queries = _image_data()
    with pytest.raises(tt.ConfigurationError, match="one value per training example"):
        tt.report(tmp_path / "r.html", train=train, self_influence=torch.zeros(3))
    with pytest.raises(tt.ConfigurationError, match="train holds 12"):
        tt.report(tmp_path / "r.html", train=train, queries=queries, top=_top(2, 50, 3))
    with pytest.raises(tt.ConfigurationError, match="needs the queries"):
        tt.report(tmp_path / "r.html", train=train, top=_top(2, 12, 3))
    with pytest.raises(tt.ConfigurationError, match="render must be"):
        tt.report(tmp_path / "r.html", train=train, render="video")
    with pytest.raises(tt.ConfigurationError, match="NaN"):
        tt.report(tmp_path / "r.html", train=train, self_influence=torch.full((12,), np.nan))


def _chromium_check(page: Path, tmp_path: Path) -> tuple[dict, list[str]]:
    """Open ``page`` in headless Chromium; ``(result of an in-page check, console lines)``.

    A copy of the page gets one script (allowed by a nonce added to its CSP) that counts the
    images that failed to decode, script elements and event-handler attributes after load;
    ``--dump-dom`` prints the DOM with the result, and ``--enable-logging=stderr`` every console
    message (CSP violations and JavaScript errors included).
    """
    check = """<script nonce="ttcheck">
window.addEventListener('load', function () {
  var imgs = Array.from(document.images), handlers = 0;
  document.querySelectorAll('*').forEach(function (el) {
    for (var a of el.attributes) { if (a.name.toLowerCase().indexOf('on') === 0) handlers++; }
  });
  var out = document.createElement('pre');
  out.id = 'ttcheck';
  out.textContent = JSON.stringify({images: imgs.length, scripts: document.scripts.length,
    broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length,
    handlers: handlers, title: document.title});
  document.body.appendChild(out);
});
</script>"""
    html = page.read_text()
    assert html.count(CSP) == 1
    html = html.replace(
        CSP, CSP.replace("default-src 'none';", "default-src 'none'; script-src 'nonce-ttcheck';")
    )
    copy = tmp_path / "checked.html"
    copy.write_text(html.replace("</body>", check + "</body>"))
    proc = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=5000", "--dump-dom", copy.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="ttcheck">(.*?)</pre>', proc.stdout, flags=re.S)
    assert found, "the check did not run: " + proc.stderr[-2000:]
    result = json.loads(html_module.unescape(found.group(1)))
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return result, console


@pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) to open "
    "the report in a headless browser",
)
@pytest.mark.parametrize("kind", ["image", "text"])
def test_report_in_headless_chromium(tmp_path, kind):
    page = _write(kind, tmp_path / "report.html")
    result, console = _chromium_check(page, tmp_path)
    assert console == [], console
    assert result["broken"] == 0, result
    assert result["images"] == (2 * 7 + 5 + 1 if kind == "image" else 1)
    assert result["scripts"] == 1 and result["handlers"] == 0, result  # only the check itself
    # no hostile script or handler ran (it would have set the title to PWNED): shown as text
    assert result["title"] == "report " + HOSTILE
