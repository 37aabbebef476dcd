"""A self-contained HTML report: inline PNG images and plots, no external links or scripts.

:func:`report` (``tt.report``) writes the page for any data — images (tensors, arrays or PIL
images), text, or table rows: queries with their proponents and opponents, the self-influence
ranking, the mislabel-detection curve when the flipped labels are known, and an evaluation
table. It is built from :class:`HTMLReport` sections and :class:`Card` galleries.

Every string is HTML-escaped unless it is a :class:`Markup` (HTML this module built itself),
and the page carries a Content-Security-Policy that allows no script and no external resource,
so a hostile label or text (``<script>``, ``onerror=``) shows as text and cannot run.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from traintrace.exceptions import ConfigurationError
from traintrace.retrieval.topk import TopK

__all__ = ["Card", "HTMLReport", "Markup", "figure_png", "image_png", "report"]

#: No scripts, no external resources: images and styles must be inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class Markup(str):
    """A string of HTML built by this module: inserted as is, where plain strings are escaped."""


def escape(text: object) -> str:
    """``text`` as HTML: a :class:`Markup` unchanged, anything else escaped (quotes included)."""
    return text if isinstance(text, Markup) else html.escape(str(text), quote=True)


def img(src: str, alt: str) -> Markup:
    """An ``<img>`` tag for a ``data:`` URI with an escaped ``alt`` text."""
    if not src.startswith("data:image/"):
        raise ValueError("report images must be inline data: URIs")
    return Markup(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">')


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
.row { display: flex; align-items: flex-start; gap: .4rem; margin: .3rem 0; }
.row-label { flex: 0 0 9rem; font-size: .85rem; font-weight: 600; padding-top: 1.2rem; }
.cards { display: flex; flex-wrap: wrap; gap: .4rem; flex: 1; }
.card { width: 5.6rem; text-align: center; font-size: .75rem; border-radius: 4px;
        padding: .15rem; }
.card img { width: 4.8rem; height: 4.8rem; image-rendering: pixelated;
            border: 1px solid #bbb; }
.card.flag { background: #ffe0e0; }
.card.big img { width: 7rem; height: 7rem; }
.pos { color: #0a6d2c; } .neg { color: #b00020; }
.card.wide { width: 11.5rem; text-align: left; border: 1px solid #e4e4e4; }
.card .text { font-size: .82rem; white-space: pre-wrap; overflow-wrap: anywhere;
              margin-bottom: .2rem; }
.card table.row-values { font-size: .72rem; font-family: ui-monospace, monospace;
              border-collapse: collapse; margin-bottom: .2rem; }
.card table.row-values td { padding: 0 .3rem 0 0; }
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
    """One example shown in a gallery: its body and caption lines.

    ``body`` and each caption line are escaped unless they are :class:`Markup` (see :func:`img`,
    :func:`scored`), so user text (labels, names, decoded examples) is always shown as text.
    """

    body: str
    caption: Sequence[str] = ()
    flag: bool = False
    big: bool = False
    wide: bool = False

    def html(self) -> str:
        cls = "card" + " flag" * self.flag + " big" * self.big + " wide" * self.wide
        caption = "<br>".join(escape(c) for c in self.caption)
        return f'<div class="{cls}">{escape(self.body)}<div>{caption}</div></div>'


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
        self.parts.append(img(figure_png(fig), alt))

    def gallery(self, rows: Sequence[tuple[str, Sequence[Card]]], title: str = "") -> None:
        """Labelled rows of cards, boxed together (e.g. a query with its proponents)."""
        inner = "".join(
            f'<div class="row"><div class="row-label">{escape(label)}</div><div class="cards">'
            + "".join(c.html() for c in cards)
            + "</div></div>"
            for label, cards in rows
        )
        heading = f"<h3>{html.escape(title)}</h3>" if title else ""
        self.parts.append(f'<div class="query">{heading}{inner}</div>')

    def render(self) -> str:
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>" + "\n".join(self.parts) + "</body></html>"
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path


def scored(value: float, fmt: str = "{:+.3g}") -> Markup:
    """A score coloured by sign (green helps, red hurts)."""
    cls = "pos" if value > 0 else "neg"
    return Markup(f'<span class="{cls}">{html.escape(fmt.format(value))}</span>')


# -- tt.report: the page for any data ------------------------------------------------------------

_IMAGE_KEYS = ("image", "img", "pixel_values")
_TEXT_KEYS = ("text", "sentence", "content", "document")
_LABEL_KEYS = ("labels", "label")
_TEXT_LIMIT = 400


def _is_pil(obj: Any) -> bool:
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "mode") and hasattr(obj, "save")


def _as_array(obj: Any) -> np.ndarray | None:
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().float().numpy()
    except ModuleNotFoundError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(obj, np.ndarray):
        return obj
    return None


def _image_layout(arr: np.ndarray) -> np.ndarray | None:
    """``arr`` as ``[H, W]`` or ``[H, W, 3|4]`` when it looks like an image, else ``None``."""
    if arr.dtype.kind not in "biuf":
        return None
    if arr.ndim == 2 and min(arr.shape) >= 4:
        return arr
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and min(arr.shape[1:]) >= 4:
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and min(arr.shape[:2]) >= 4:
        return arr[..., 0] if arr.shape[-1] == 1 else arr
    return None


def _png(image: Any) -> str:
    """A ``data:`` URI of a PIL image or an image array (any range: scaled to 0-255)."""
    from PIL import Image

    if not _is_pil(image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            if not np.isfinite(arr).all():
                arr = np.nan_to_num(arr)
            lo, hi = float(arr.min()), float(arr.max())
            arr = ((arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)).round()
            arr = arr.astype(np.uint8)
        image = Image.fromarray(arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _split(example: Any) -> tuple[Any, Any]:
    """``(inputs, label)`` of one example: ``(x, y)`` tuples, mappings with a label key, or x."""
    if isinstance(example, Mapping):
        label = next((example[k] for k in _LABEL_KEYS if k in example), None)
        rest = {k: v for k, v in example.items() if k not in _LABEL_KEYS}
        return rest, label
    if isinstance(example, (tuple, list)) and len(example) >= 2:
        return (example[0] if len(example) == 2 else tuple(example[:-1])), example[-1]
    return example, None


def _label_text(label: Any, names: Sequence[str] | None) -> str | None:
    if label is None:
        return None
    arr = _as_array(label)
    if arr is not None:
        if arr.size != 1:
            return None
        label = arr.reshape(-1)[0].item()
    if isinstance(label, float) and label.is_integer() and names:
        label = int(label)
    if names and isinstance(label, (int, np.integer)) and 0 <= int(label) < len(names):
        return f"{names[int(label)]} ({int(label)})"
    return str(label)


class _Renderer:
    """Turns one example into a card body: an image, a text block or a small table."""

    def __init__(self, mode: str, text: str | Callable[[Any], str] | None) -> None:
        if mode not in ("auto", "image", "text", "table"):
            raise ConfigurationError(
                f"render must be 'auto', 'image', 'text' or 'table', got {mode!r}"
            )
        if text is not None and not (isinstance(text, str) or callable(text)):
            raise ConfigurationError(
                f"text must be a key of mapping examples or a function example -> str, got "
                f"{type(text).__name__}"
            )
        self.mode = "text" if text is not None and mode == "auto" else mode
        self.text = text

    def kind(self, inputs: Any) -> str:
        if self.mode != "auto":
            return self.mode
        if isinstance(inputs, str):
            return "text"
        if _is_pil(inputs):
            return "image"
        if isinstance(inputs, Mapping):
            if any(k in inputs for k in _IMAGE_KEYS):
                return "image"
            if any(isinstance(inputs.get(k), str) for k in _TEXT_KEYS):
                return "text"
            return "table"
        arr = _as_array(inputs)
        if arr is not None and _image_layout(arr) is not None:
            return "image"
        return "table"

    def __call__(self, example: Any, alt: str) -> tuple[Markup, bool]:
        """``(body, wide)`` for one example."""
        inputs, _ = _split(example)
        kind = self.kind(inputs)
        if kind == "text":
            return self._text(example, inputs), True
        if kind == "image":
            return self._image(inputs, alt), False
        return self._table(inputs), True

    def _text(self, example: Any, inputs: Any) -> Markup:
        if callable(self.text):
            value = self.text(example)
        elif isinstance(self.text, str):
            if not isinstance(example, Mapping) or self.text not in example:
                raise ConfigurationError(
                    f"text={self.text!r} names a field, but the examples are "
                    f"{type(example).__name__}"
                    + (
                        f" with keys {sorted(map(str, example))}"
                        if isinstance(example, Mapping)
                        else ""
                    )
                    + "; pass text=a function example -> str instead"
                )
            value = example[self.text]
        elif isinstance(inputs, Mapping):
            value = next((inputs[k] for k in _TEXT_KEYS if isinstance(inputs.get(k), str)), inputs)
        else:
            value = inputs
        value = str(value)
        if len(value) > _TEXT_LIMIT:
            value = value[:_TEXT_LIMIT] + " …"
        return Markup(f'<div class="text">{escape(value)}</div>')

    def _image(self, inputs: Any, alt: str) -> Markup:
        if isinstance(inputs, Mapping):
            inputs = next(inputs[k] for k in _IMAGE_KEYS if k in inputs)
        if _is_pil(inputs):
            return img(_png(inputs), alt)
        arr = _as_array(inputs)
        if arr is None:
            arr = np.asarray(inputs)
        layout = _image_layout(arr)
        if layout is None:
            raise ConfigurationError(
                f"cannot show an example of shape {arr.shape} as an image: expected [H, W], "
                "[C, H, W] or [H, W, C] with C in 1, 3, 4; use render='table' or 'text'"
            )
        return img(_png(layout), alt)

    def _table(self, inputs: Any) -> Markup:
        if isinstance(inputs, Mapping):
            items = [(str(k), v) for k, v in inputs.items()]
        else:
            arr = _as_array(inputs)
            values = np.asarray(inputs if arr is None else arr, dtype=object).reshape(-1)
            items = [(f"x{i}", v) for i, v in enumerate(values)]
        shown = items[:8]
        rows = "".join(
            f"<tr><td>{escape(k)}</td><td>{escape(_short_value(v))}</td></tr>" for k, v in shown
        )
        more = f"<tr><td colspan=2>… {len(items)} values</td></tr>" if len(items) > 8 else ""
        return Markup(f'<table class="row-values">{rows}{more}</table>')


def _short_value(value: Any) -> str:
    arr = _as_array(value)
    if arr is not None:
        if arr.size == 1:
            value = arr.reshape(-1)[0].item()
        else:
            return f"[{arr.size} values]"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 40 else text[:40] + "…"


def _examples(data: Any, name: str) -> Any:
    """Indexable examples of a Dataset, DataLoader (its dataset) or sequence."""
    dataset = getattr(data, "dataset", data)
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ConfigurationError(
            f"{name} must support len() and integer indexing (a map-style Dataset, a DataLoader "
            f"over one, or a list), got {type(data).__name__}"
        )
    return dataset


def _vector(values: Any, name: str, n: int, dtype: Any = float) -> np.ndarray:
    arr = _as_array(values)
    arr = np.asarray(values if arr is None else arr, dtype=dtype)
    if arr.shape != (n,):
        raise ConfigurationError(
            f"{name} must hold one value per training example ({n}), got shape {arr.shape}"
        )
    if dtype is float and not np.isfinite(arr).all():
        raise ConfigurationError(f"{name} contains NaN or infinity")
    return arr


def _evaluation_rows(evaluation: Any) -> tuple[list[str], list[list[Any]]]:
    """``(header, rows)`` of a DataFrame, ``{row: {column: value}}`` or a list of mappings."""
    if hasattr(evaluation, "columns") and hasattr(evaluation, "itertuples"):
        frame = evaluation.reset_index() if evaluation.index.name else evaluation
        return [str(c) for c in frame.columns], [list(r) for r in frame.itertuples(index=False)]
    if isinstance(evaluation, Mapping):
        rows = list(evaluation.items())
        if not all(isinstance(v, Mapping) for _, v in rows):
            raise ConfigurationError("evaluation as a mapping must be {row name: {column: value}}")
        columns = list(dict.fromkeys(c for _, v in rows for c in v))
        return ["", *map(str, columns)], [[k, *(v.get(c, "") for c in columns)] for k, v in rows]
    if isinstance(evaluation, Sequence) and all(isinstance(r, Mapping) for r in evaluation):
        columns = list(dict.fromkeys(c for r in evaluation for c in r))
        return list(map(str, columns)), [[r.get(c, "") for c in columns] for r in evaluation]
    raise ConfigurationError(
        "evaluation must be a pandas DataFrame, {row: {column: value}} or a list of mappings, "
        f"got {type(evaluation).__name__}"
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def report(
    path: str | Path,
    *,
    train: Any,
    top: TopK | None = None,
    queries: Any = None,
    self_influence: Any = None,
    flipped: Any = None,
    baselines: Mapping[str, Any] | None = None,
    evaluation: Any = None,
    render: Literal["auto", "image", "text", "table"] = "auto",
    text: str | Callable[[Any], str] | None = None,
    label_names: Sequence[str] | None = None,
    query_captions: Sequence[Sequence[str]] | None = None,
    top_self_influence: int = 30,
    title: str = "traintrace report",
    explains: str | None = None,
    method: str | None = None,
) -> Path:
    """Write a self-contained HTML page of attribution results for any data; returns its path.

    Sections (each present when its inputs are): every query of ``top`` with its proponents
    (largest scores: the training examples that help it) and opponents (most negative: those
    that hurt it); the ``top_self_influence`` training examples with the highest
    ``self_influence``; the mislabel-detection curve of the self-influence ranking (and of each
    of ``baselines``, e.g. the training loss) when the boolean mask ``flipped`` of known
    mislabeled examples is given; the ``evaluation`` table.

    Args:
        path: the HTML file to write (its folder is created).
        train: the training data (Dataset, DataLoader over one, or a list): example ``i`` is the
            one behind ``train_index`` ``i`` of ``top`` and ``self_influence[i]``.
        top: :meth:`~traintrace.TracIn.top_k` of ``queries`` (``[n_query, k]``).
        queries: the queries of ``top``, in the same order.
        self_influence: ``[n_train]`` scores (higher = more suspicious).
        flipped: ``[n_train]`` booleans: examples known to be mislabeled (shaded red).
        baselines: other ``[n_train]`` rankings for the mislabel curve, by name.
        evaluation: a pandas DataFrame, ``{row: {column: value}}`` or a list of mappings.
        render: how examples are shown: ``"image"`` (tensors/arrays ``[H, W]``, ``[C, H, W]``,
            ``[H, W, C]`` scaled to 0-255, or PIL images), ``"text"``, ``"table"`` (the first
            values of a row), or ``"auto"`` (guessed per example).
        text: show examples as text: the key of a text field of mapping examples (e.g.
            ``"text"``), or a function ``example -> str`` (e.g. decoding token ids).
        label_names: class names, shown beside integer labels.
        query_captions: extra caption lines per query (e.g. the model's prediction).
        top_self_influence: how many of the highest self-influence examples to show.
        title: the page title.
        explains: a sentence saying which quantity the scores explain (which label's loss or
            margin); shown at the top.
        method: a line naming the estimator.

    Every string (labels, texts, captions, names, title) is HTML-escaped, and the page's
    Content-Security-Policy allows no script or external resource. Cost: one PNG per shown image.
    """
    train_examples = _examples(train, "train")
    n_train = len(train_examples)
    names = list(label_names) if label_names is not None else None
    renderer = _Renderer(render, text)
    flip = None if flipped is None else _vector(flipped, "flipped", n_train, bool)
    si = None if self_influence is None else _vector(self_influence, "self_influence", n_train)
    if top_self_influence < 1:
        raise ConfigurationError(f"top_self_influence must be >= 1, got {top_self_influence}")
    rep = HTMLReport(title)
    rep.paragraph(
        f"{method + '. ' if method else ''}{n_train} training examples. Sign convention: a "
        "positive score means the training example helps the query (a gradient step on it "
        "lowers the query's loss, or raises its margin); proponents have the largest scores, "
        "opponents the most negative."
        + (" Training examples known to be mislabeled are shaded red." if flip is not None else "")
    )
    if explains:
        rep.paragraph("The scores explain " + explains + ".", note=True)

    def train_card(i: int, caption: Sequence[str]) -> Card:
        example = train_examples[i]
        body, wide = renderer(example, f"train {i}")
        label = _label_text(_split(example)[1], names)
        cap = [f"#{i}" + (f" label {label}" if label is not None else "")]
        if flip is not None and flip[i]:
            cap.append("known mislabeled")
        return Card(body, [*cap, *caption], bool(flip is not None and flip[i]), wide=wide)

    if top is not None:
        if queries is None:
            raise ConfigurationError("top= needs the queries it was computed for: queries=...")
        query_examples = _examples(queries, "queries")
        n_query, k = top.proponents.indices.shape
        if len(query_examples) != n_query:
            raise ConfigurationError(
                f"top has {n_query} queries but queries holds {len(query_examples)} examples"
            )
        biggest = int(max(top.proponents.indices.max(), top.opponents.indices.max()))
        if biggest >= n_train:
            raise ConfigurationError(
                f"top refers to training example {biggest} but train holds {n_train}: pass the "
                "training data the estimator was fitted on"
            )
        if query_captions is not None and len(query_captions) != n_query:
            raise ConfigurationError(
                f"query_captions has {len(query_captions)} entries for {n_query} queries"
            )
        rep.heading(f"Queries with their top-{k} proponents and opponents", anchor="queries")
        for q in range(n_query):
            example = query_examples[q]
            body, wide = renderer(example, f"query {q}")
            label = _label_text(_split(example)[1], names)
            cap = [f"query #{q}"] + ([f"label {label}"] if label is not None else [])
            cap += list(query_captions[q]) if query_captions is not None else []
            rows: list[tuple[str, Sequence[Card]]] = [
                ("query", [Card(body, cap, big=not wide, wide=wide)])
            ]
            for name, ranking in (
                ("proponents (help)", top.proponents),
                ("opponents (hurt)", top.opponents),
            ):
                rows.append(
                    (
                        name,
                        [
                            train_card(int(i), [scored(float(s))])
                            for i, s in zip(ranking.indices[q], ranking.scores[q], strict=True)
                        ],
                    )
                )
            rep.gallery(rows)

    if si is not None:
        shown = min(top_self_influence, n_train)
        order = np.argsort(-si, kind="stable")[:shown]
        rep.heading(
            f"The {shown} training examples with the highest self-influence",
            anchor="self-influence",
        )
        msg = (
            "Self-influence is how much a training example helps itself (Σ_c η_c ‖∇loss‖² for "
            "TracIn): mislabeled and unusual examples come first."
        )
        if flip is not None:
            msg += f" {int(flip[order].sum())} of these {shown} are known to be mislabeled."
        rep.paragraph(msg)
        cards = [train_card(int(i), [f"self-influence {si[i]:.3g}"]) for i in order]
        per_row = 4 if cards and cards[0].wide else 10
        for start in range(0, len(cards), per_row):
            chunk = cards[start : start + per_row]
            rep.gallery([(f"rank {start + 1}-{start + len(chunk)}", chunk)])

    if flip is not None and si is not None:
        _mislabel_section(rep, si, flip, baselines or {}, n_train)

    if evaluation is not None:
        header, rows = _evaluation_rows(evaluation)
        rep.heading("Evaluation", anchor="evaluation")
        rep.table(header, [[_cell(c) for c in row] for row in rows])
    return rep.save(path)


def _mislabel_section(
    rep: HTMLReport, si: np.ndarray, flip: np.ndarray, baselines: Mapping[str, Any], n: int
) -> None:
    from matplotlib.figure import Figure

    from traintrace.evaluation.mislabel import mislabel_detection

    rankings = {"self-influence": si, **{k: _vector(v, k, n) for k, v in baselines.items()}}
    detection = {name: mislabel_detection(v, flip) for name, v in rankings.items()}
    rep.heading("Finding the mislabeled training examples", anchor="mislabels")
    fig = Figure(figsize=(5.2, 3.8))
    ax = fig.add_subplot()
    for name, det in detection.items():
        ax.plot(det.inspected, det.found, label=f"{name} (AUROC {det.auroc:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="random order")
    ax.set_xlabel("fraction of training set inspected (highest score first)")
    ax.set_ylabel("fraction of mislabeled examples found")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    rep.figure(fig, "mislabel detection curve")
    fractions = sorted(next(iter(detection.values())).recall)
    rep.table(
        ["ranking", *(f"found @{f:.0%}" for f in fractions), "AUROC"],
        [
            [name, *(f"{d.recall[f]:.1%}" for f in fractions), f"{d.auroc:.3f}"]
            for name, d in detection.items()
        ],
    )
