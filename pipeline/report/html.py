"""HTML rendering: every string is escaped here, and the page links nothing outside itself."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

TOP = 5  # labels shown per object and per image
TOP_FREQUENT = 20  # rows in the "most frequent top-1" tables

# No network, no scripts: even a string that escaped escaping could not run or fetch anything.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em;color:#222;
background:#f6f6f3}
h1{margin:0 0 .2em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:1.5em}
.meta{color:#555}code{font-size:.9em}
table{border-collapse:collapse;margin:.4em 0;font-size:.9em}
td,th{padding:.15em .6em;text-align:left;vertical-align:top}
tr:nth-child(even){background:#ecece8}
.kv th{font-weight:600}.num-cell{text-align:right;font-variant-numeric:tabular-nums}
.tops{display:flex;flex-wrap:wrap;gap:2em}
.card{background:#fff;border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.8em;
box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card header{font-size:1.05em;margin-bottom:.5em}
.row{display:flex;flex-wrap:wrap;gap:1em}
.picture img{display:block;max-width:100%;border:1px solid #999}
figure{margin:0}
.side{flex:1;min-width:18em}.side .labels{max-width:30em}
.caption{margin:0 0 .6em;padding:.4em .8em;background:#f1f1ec;border-left:4px solid #888;
white-space:pre-wrap;overflow-wrap:anywhere}
.badge{display:inline-block;padding:.05em .5em;border-radius:1em;font-size:.85em;color:#fff}
.itm1{background:#2e7d32}.itm0{background:#c62828}.itmx{background:#777}
.objects{display:flex;flex-wrap:wrap;gap:.8em;margin-top:.6em}
.object{border:1px solid #ddd;border-radius:4px;padding:.4em;width:19em;background:#fafaf8}
.object img{float:left;margin:0 .5em .3em 0;border:1px solid #999}
.obj-head{font-size:.9em;margin-bottom:.2em}
.tag{display:inline-block;min-width:1.3em;text-align:center;color:#fff;font-weight:700;
border-radius:3px}
.labels{clear:both;width:100%}.labels td{padding:.05em .3em}
.bar{display:inline-block;height:.7em;background:#5b8cc8;vertical-align:middle}
.rel .bar{background:#c8825b}
.error{color:#b00020;font-weight:600}
.muted{color:#777}
"""


@dataclass
class ObjectView:
    number: int
    colour: tuple[int, int, int]
    box_class: str
    conf: float | None
    crop_uri: str | None
    labels: list[tuple[str, float]]
    kept_mass: float | None


@dataclass
class CardView:
    index: int
    sample_id: str
    source: str
    itm: int | None
    caption: str
    width: int | None
    height: int | None
    picture_uri: str | None
    relations: list[tuple[str, float]]
    rel_mass: float | None
    objects: list[ObjectView] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _fmt_prob(p: float) -> str:
    return f"{p:.3f}"


def _label_rows(labels: Sequence[tuple[str, float]]) -> str:
    rows = []
    for name, prob in labels:
        width = f"{max(0.0, min(prob, 1.0)) * 100:.1f}%"
        rows.append(
            f'<tr><td>{escape(name)}</td><td class="num-cell">{_fmt_prob(prob)}</td>'
            f'<td style="width:5em"><span class="bar" style="width:{width}"></span></td></tr>'
        )
    return "".join(rows) or '<tr><td class="muted">no labels</td></tr>'


def _itm_badge(itm: int | None) -> str:
    if itm == 1:
        return '<span class="badge itm1">itm=1 matched</span>'
    if itm == 0:
        return '<span class="badge itm0">itm=0 mismatched</span>'
    return f'<span class="badge itmx">itm={escape(str(itm))}</span>'


def render_object(obj: ObjectView) -> str:
    r, g, b = obj.colour
    crop = (
        f'<img class="crop" src="{obj.crop_uri}" alt="crop of object {obj.number}">'
        if obj.crop_uri
        else ""
    )
    conf = (
        "" if obj.conf is None else f" {obj.conf:.2f}" if obj.conf >= 0.01 else f" {obj.conf:.1e}"
    )
    mass = (
        f'<div class="muted">kept mass {obj.kept_mass:.3f}</div>'
        if obj.kept_mass is not None
        else ""
    )
    return (
        f'<div class="object">{crop}<div class="obj-head">'
        f'<span class="tag" style="background:rgb({r},{g},{b})">{obj.number}</span> '
        f"{escape(obj.box_class)}{conf}</div>{mass}"
        f'<table class="labels ent">{_label_rows(obj.labels)}</table></div>'
    )


def render_card(card: CardView) -> str:
    errors = "".join(f'<div class="error">{escape(e)}</div>' for e in card.errors)
    size = f"{card.width}x{card.height}" if card.width and card.height else "size unknown"
    picture = (
        f'<figure class="picture"><img src="{card.picture_uri}" '
        f'alt="{escape(card.sample_id)} with {len(card.objects)} boxes"></figure>'
        if card.picture_uri
        else ""
    )
    rel_mass = f" (kept mass {card.rel_mass:.3f})" if card.rel_mass is not None else ""
    objects = "".join(render_object(o) for o in card.objects)
    if not card.objects:
        objects = '<div class="muted">no detections</div>'
    return (
        f'<article class="card" id="sample-{card.index}" data-sample-id="{escape(card.sample_id)}">'
        f"<header><b>#{card.index}</b> <code>{escape(card.sample_id)}</code> "
        f'{_itm_badge(card.itm)} <span class="muted">{escape(card.source)} · {size} · '
        f"{len(card.objects)} objects</span></header>{errors}"
        f'<div class="row">{picture}<div class="side">'
        f'<blockquote class="caption">{escape(card.caption)}</blockquote>'
        f"<div><b>Top relations</b>{escape(rel_mass)}</div>"
        f'<table class="labels rel">{_label_rows(card.relations)}</table></div></div>'
        f'<div class="objects">{objects}</div></article>'
    )


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(
        f'<tr><th>{escape(str(k))}</th><td class="num-cell">{escape(str(v))}</td></tr>'
        for k, v in rows
    )
    return f'<table class="kv">{body}</table>'


def _frequency_table(title: str, counter: Counter, names: Sequence[str] | None, total: int) -> str:
    rows = []
    for key, count in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))[:TOP_FREQUENT]:
        name = label_name(key, names) if names is not None else str(key)
        share = f"{count / total:.1%}" if total else ""
        rows.append(
            f'<tr><td>{escape(name)}</td><td class="num-cell">{count}</td>'
            f'<td class="num-cell">{share}</td></tr>'
        )
    body = "".join(rows) or '<tr><td class="muted">none</td></tr>'
    return (
        f'<div><h3>{escape(title)}</h3><table class="freq"><tr><th>label</th><th>count</th>'
        f"<th>share</th></tr>{body}</table></div>"
    )


def _rejected_section(
    rejected_by_reason: dict[str, int], rejected_items: Sequence[dict[str, Any]], total: int
) -> str:
    """Rejections by reason (a table), and the rejected samples themselves (folded)."""
    rows = "".join(
        f'<tr><td>{escape(str(reason))}</td><td class="num-cell">{count}</td></tr>'
        for reason, count in sorted(rejected_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    html = (
        f'<table class="rejected"><tr><th>reason</th><th>count</th></tr>{rows}</table>'
        if rows
        else '<p class="muted">none recorded in manifest.json</p>'
    )
    if rejected_items:
        items = "".join(
            f"<li><code>{escape(str(it.get('id', '?')))}</code>: "
            f"{escape(str(it.get('reason', '?')))}</li>"
            for it in rejected_items
        )
        more = total - len(rejected_items)
        more_html = f'<li class="muted">… and {more} more</li>' if more > 0 else ""
        html += (
            f"<details><summary>rejected samples ({len(rejected_items)} listed)</summary>"
            f"<ul>{items}{more_html}</ul></details>"
        )
    return html


def _sharpness_table(rows: Sequence[Sequence[str]]) -> str:
    """How soft the labels are: 1 - top-1 mass is what a hard label would throw away."""
    head = (
        "<tr><th>labels</th><th>mean top-1 mass</th><th>mean mass beyond the top-1</th>"
        "<th>mean entropy (nats)</th><th>uniform entropy (nats)</th></tr>"
    )
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f'<table class="freq">{head}{body}</table>'


def label_name(index: int, names: Sequence[str]) -> str:
    return names[index] if 0 <= index < len(names) else f"[index {index} out of range]"


def render_page(
    *,
    title: str,
    header_rows: Sequence[tuple[str, Any]],
    count_rows: Sequence[tuple[str, Any]],
    manifest_counts: dict[str, Any],
    rejected_by_reason: dict[str, int],
    rejected_items: Sequence[dict[str, Any]],
    rejected_total: int,
    no_detection_ids: Sequence[str],
    unreadable: Sequence[dict[str, str]],
    histogram_uri: str,
    top1_entity: Counter,
    top1_relation: Counter,
    box_classes: Counter,
    entity_names: Sequence[str],
    relation_names: Sequence[str],
    n_objects: int,
    n_images: int,
    manifest_extra: dict[str, Any],
    sharpness: Sequence[Sequence[str]],
    cards: Sequence[CardView],
) -> str:
    """The whole page as one string."""
    rejected_html = _rejected_section(rejected_by_reason, rejected_items, rejected_total)
    no_det = ", ".join(f"<code>{escape(i)}</code>" for i in no_detection_ids) or "none"
    unreadable_html = (
        "<h3>Unreadable shards or samples</h3><ul>"
        + "".join(
            f"<li><code>{escape(u['where'])}</code>: {escape(u['reason'])}</li>" for u in unreadable
        )
        + "</ul>"
        if unreadable
        else ""
    )
    manifest_json = escape(json.dumps(manifest_extra, indent=2, sort_keys=True, ensure_ascii=False))
    header = " · ".join(f"{escape(str(k))}: <code>{escape(str(v))}</code>" for k, v in header_rows)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f'<h1>{escape(title)}</h1><p class="meta">{header}</p>\n'
        '<section id="summary"><h2>Summary</h2><div class="tops">'
        f"<div><h3>Counts (this scan)</h3>{_kv_table(count_rows)}</div>"
        f"<div><h3>Counts (manifest.json)</h3>{_kv_table(sorted(manifest_counts.items()))}</div>"
        f"<div><h3>Rejected samples by reason</h3>{rejected_html}</div></div>"
        f"<h3>Images without detections ({len(no_detection_ids)} listed)</h3><p>{no_det}</p>"
        f"{unreadable_html}"
        "<h3>Label distributions</h3>"
        + _sharpness_table(sharpness)
        + f'<img class="plot" src="{histogram_uri}" '
        'alt="histograms of label entropy and kept mass">'
        '<div class="tops">'
        + _frequency_table(
            "Most frequent top-1 entities (per object)", top1_entity, entity_names, n_objects
        )
        + _frequency_table(
            "Most frequent top-1 relations (per image)", top1_relation, relation_names, n_images
        )
        + _frequency_table("Detector classes", box_classes, None, n_objects)
        + "</div>"
        f"<details><summary>manifest.json (parameters, models, vocabularies)</summary>"
        f"<pre>{manifest_json}</pre></details></section>\n"
        f'<section id="samples"><h2>Samples ({len(cards)} of {n_images})</h2>\n'
        + "\n".join(render_card(c) for c in cards)
        + "\n</section></body></html>\n"
    )
