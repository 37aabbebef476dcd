"""A self-contained HTML report: inline PNG images and plots, no external links or scripts.

The report is a list of sections built with :class:`HTMLReport`; any estimator's results can be
shown by passing a function that renders one example (an image, or escaped text) as HTML.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Card", "HTMLReport", "figure_png", "image_png"]

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto;
       max-width: 1200px; color: #222; line-height: 1.4; padding: 0 1rem; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table.metrics { border-collapse: collapse; margin: .5rem 0 1rem; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: .25rem .6rem;
       text-align: right; }
table.metrics th { background: #f4f4f4; }
table.metrics td:first-child, table.metrics th:first-child { text-align: left; }
.note { color: #555; font-size: .92rem; }
.query { border: 1px solid #ddd; border-radius: 6px; padding: .6rem; margin: 1rem 0; }
.row { display: flex; align-items: flex-start; gap: .4rem; margin: .3rem 0; flex-wrap: wrap; }
.row-label { width: 9rem; font-size: .85rem; font-weight: 600; padding-top: 1.2rem; }
.card { width: 5.6rem; text-align: center; font-size: .75rem; border-radius: 4px;
        padding: .15rem; }
.card img { width: 4.8rem; height: 4.8rem; image-rendering: pixelated;
            border: 1px solid #bbb; }
.card.flag { background: #ffe0e0; }
.card.big img { width: 7rem; height: 7rem; }
.pos { color: #0a6d2c; } .neg { color: #b00020; }
"""


def image_png(array: np.ndarray, cmap: str = "gray_r") -> str:
    """A ``data:`` URI holding ``array`` (2-D grey or HxWx3) as a PNG."""
    from matplotlib import image as mpl_image

    buf = io.BytesIO()
    mpl_image.imsave(buf, np.asarray(array, dtype=float), cmap=cmap, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_png(fig: Any) -> str:
    """A ``data:`` URI holding a matplotlib Figure as a PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Card:
    """One example shown in a gallery: its rendered HTML and caption lines."""

    body: str
    caption: Sequence[str] = ()
    flag: bool = False
    big: bool = False

    def html(self) -> str:
        cls = "card" + (" flag" if self.flag else "") + (" big" if self.big else "")
        caption = "<br>".join(self.caption)
        return f'<div class="{cls}">{self.body}<div>{caption}</div></div>'


@dataclass
class HTMLReport:
    """Accumulates sections and writes one self-contained HTML file."""

    title: str
    parts: list[str] = field(default_factory=list)

    def heading(self, text: str, anchor: str | None = None) -> None:
        ident = f' id="{html.escape(anchor)}"' if anchor else ""
        self.parts.append(f"<h2{ident}>{html.escape(text)}</h2>")

    def paragraph(self, text: str, *, note: bool = False, raw: bool = False) -> None:
        body = text if raw else html.escape(text)
        self.parts.append(f'<p class="{"note" if note else ""}">{body}</p>')

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
            for row in rows
        )
        self.parts.append(f'<table class="metrics"><tr>{head}</tr>{body}</table>')

    def figure(self, fig: Any, alt: str) -> None:
        self.parts.append(f'<img src="{figure_png(fig)}" alt="{html.escape(alt)}">')

    def gallery(self, rows: Sequence[tuple[str, Sequence[Card]]], title: str = "") -> None:
        """Labelled rows of cards, boxed together (e.g. a query with its proponents)."""
        inner = "".join(
            f'<div class="row"><div class="row-label">{label}</div>'
            + "".join(c.html() for c in cards)
            + "</div>"
            for label, cards in rows
        )
        heading = f"<h3>{html.escape(title)}</h3>" if title else ""
        self.parts.append(f'<div class="query">{heading}{inner}</div>')

    def render(self) -> str:
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>" + "\n".join(self.parts) + "</body></html>"
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path


def scored(value: float, fmt: str = "{:+.3g}") -> str:
    """A score coloured by sign (green helps, red hurts)."""
    cls = "pos" if value > 0 else "neg"
    return f'<span class="{cls}">{fmt.format(value)}</span>'
