"""The explorer's HTML: feature pages, the neighbourhood graph, search and the index.

Every page is self-contained (inline CSS, inline SVG, a few lines of inline script for the
graph's filter) and makes no request outside the site; all corpus text goes through
`featstore.explorer.text.esc`. Links are relative, so the same pages work from `featstore serve`
(`ext=""`) and as files of a static export (`ext=".html"`); a link to a page the export did not
write is shown as plain text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from featstore.explorer.graphview import Neighbourhood
from featstore.explorer.reads import MEASURES, Context, FeatureView
from featstore.explorer.text import esc

Node = tuple[int, int]

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:78em;padding:0 1em;
color:#222}h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:1.4em 0 .4em}
nav{display:flex;gap:1em;align-items:center;border-bottom:1px solid #ddd;padding-bottom:.5em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;
text-align:right}th{background:#f3f3f3}td.l{text-align:left}.ctx{font-family:ui-monospace,
monospace;font-size:.85em;line-height:1.9}.ctx span{padding:1px 0;border-radius:2px}
.ctx .act{outline:2px solid #c00;font-weight:bold}.muted{color:#777}.lab{color:#555}
.cols{display:flex;gap:2em;flex-wrap:wrap}svg text{font-family:system-ui,sans-serif}
td{white-space:nowrap}#graph text{paint-order:stroke;stroke:#fff;stroke-width:3px}"""

SCRIPT = """function recolor(){var m=document.getElementById('measure').value,
t=parseFloat(document.getElementById('threshold').value),es=document.querySelectorAll('.edge'),
vs=[],i;for(i=0;i<es.length;i++){vs.push(parseFloat(es[i].getAttribute('data-'+m)));}
var ok=vs.filter(isFinite),lo=Math.min.apply(null,ok),hi=Math.max.apply(null,ok);
for(i=0;i<es.length;i++){var v=vs[i],x=hi>lo?(v-lo)/(hi-lo):1;es[i].style.display=
(isFinite(v)&&!(v<t))?'':'none';es[i].setAttribute('stroke',colour(x));
es[i].firstChild.textContent=m+' '+v.toPrecision(3);}}
function colour(x){return 'rgb('+Math.round(60+195*x)+','+Math.round(120-70*x)+','+
Math.round(200-170*x)+')';}"""


def colour(x: float) -> str:
    """Low values blue-grey, high values red (the same scale as the page script's)."""
    x = min(max(x, 0.0), 1.0) if math.isfinite(x) else 0.0
    return f"rgb({round(60 + 195 * x)},{round(120 - 70 * x)},{round(200 - 170 * x)})"


@dataclass(frozen=True)
class Site:
    """How pages link: `root` is the relative way back to the site's top from a page."""

    ext: str = ""  # "" under the server, ".html" in an export
    exists: Callable[[Node], bool] = lambda node: True
    labels: Callable[[Node], str] = lambda node: ""

    def href(self, root: str, kind: str, node: Node) -> str:
        return f"{root}{kind}/{node[0]}/{node[1]}{self.ext}"

    def feature_link(self, root: str, node: Node, text: str | None = None) -> str:
        shown = esc(text if text is not None else f"L{node[0]}:{node[1]}")
        if not self.exists(node):
            return shown
        return f'<a href="{self.href(root, "features", node)}">{shown}</a>'


def page(title: str, body: str, root: str, site: Site, script: str = "") -> str:
    search = f"{root}search{site.ext}"
    nav = (f'<nav><a href="{root}index{site.ext or ".html"}">featstore explorer</a>'
           f'<form action="{search}" method=get><input name=q id=q placeholder="7:123, token or '
           f'concept" size=28> <button>search</button></form></nav>')  # fmt: skip
    tail = f"<script>{script}</script>" if script else ""
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{nav}{body}{tail}</body></html>")  # fmt: skip


# -- pieces of a feature page ----------------------------------------------------------------------


def histogram_svg(bins: list[tuple[float, float, int]], width: int = 460, height: int = 110) -> str:
    if not bins:
        return "<p class=muted>never active</p>"
    top = max(c for _, _, c in bins)
    w = width / len(bins)
    bars = "".join(
        f'<rect x="{i * w:.1f}" y="{height - 16 - (height - 20) * c / top:.1f}" '
        f'width="{max(w - 1, 1):.1f}" height="{(height - 20) * c / top:.1f}" fill="#e8751a">'
        f"<title>[{lo:.3g}, {hi:.3g}): {c}"
        f"</title></rect>"
        for i, (lo, hi, c) in enumerate(bins)
    )
    axis = (f'<text x="0" y="{height - 2}" font-size="11">{bins[0][0]:.3g}</text>'
            f'<text x="{width}" y="{height - 2}" font-size="11" text-anchor="end">'
            f"{bins[-1][1]:.3g}</text>")  # fmt: skip
    return (f'<svg id=histogram width="{width}" height="{height}" role="img" '
            f'aria-label="activation histogram">{bars}{axis}</svg>'
            "<div class=muted>nonzero activations, log-spaced bins</div>")  # fmt: skip


def context_row(ctx: Context, peak: float) -> str:
    spans = []
    for i, (text, value) in enumerate(zip(ctx.texts, ctx.values, strict=True)):
        alpha = min(max(value / peak, 0.0), 1.0) if peak > 0 else 0.0
        cls = ' class="act"' if i == ctx.active else ""
        style = f"background:rgba(232,117,26,{alpha:.2f})"
        spans.append(f'<span{cls} style="{style}" title="{value:.4g}" data-value="{value:.6g}">'
                     f"{esc(text)}</span>")  # fmt: skip
    return (f"<tr><td>{ctx.value:.4g}</td><td class=l>{esc(ctx.shard)}</td><td>{ctx.seq}</td>"
            f"<td>{ctx.pos}</td><td class='l ctx'>{''.join(spans)}</td></tr>")  # fmt: skip


def contexts_table(contexts: list[Context]) -> str:
    if not contexts:
        return "<p class=muted>no contexts (no token table, or never active)</p>"
    peak = max(c.value for c in contexts)
    head = "<tr><th>value</th><th>shard</th><th>seq</th><th>pos</th><th>context</th></tr>"
    return f"<table id=contexts>{head}{''.join(context_row(c, peak) for c in contexts)}</table>"


def partner_table(frame: pl.DataFrame, measure: str, root: str, site: Site) -> str:
    if not frame.height:
        return "<p class=muted>none</p>"
    shown = [m for m in MEASURES if m in frame.columns and m != measure]
    head = (f"<tr><th>feature</th><th class=l>label</th><th>{esc(measure)}</th><th>95% interval"
            "</th><th title='mean and sd of the null model&#39;s values of this pair'>null mean"
            " ± sd</th><th>z vs null</th><th title='(1 + #null values >= this) / (K + 1)'>p vs "
            f"null</th>{''.join(f'<th>{esc(m)}</th>' for m in shown)}</tr>")  # fmt: skip
    rows = []
    for r in frame.iter_rows(named=True):
        node = (int(r["layer"]), int(r["feature"]))
        lo, hi = r.get(f"{measure}_lo"), r.get(f"{measure}_hi")
        interval = f"[{esc(lo)}, {esc(hi)}]" if lo is not None else ""
        sd = f" ± {esc(r.get('null_sd'))}" if r.get("null_sd") is not None else ""
        null = (f"<td class=null-mean data-value=\"{_attr(r.get('null_mean'))}\">"
                f"{esc(r.get('null_mean'))}{sd}</td>"
                f"<td class=null-z data-value=\"{_attr(r.get('null_z'))}\">{esc(r.get('null_z'))}"
                f"</td><td class=null-p data-value=\"{_attr(r.get('null_p'))}\">"
                f"{esc(r.get('null_p'))}</td>")  # fmt: skip
        rows.append(
            f'<tr class=partner data-layer="{node[0]}" data-feature="{node[1]}">'
            f"<td>{site.feature_link(root, node)}</td><td class='l lab'>{esc(site.labels(node))}"
            f'</td><td class=value data-value="{_attr(r[measure])}">{esc(r[measure])}</td>'
            f"<td>{interval}</td>{null}"
            + "".join(f"<td>{esc(r[m])}</td>" for m in shown)
            + "</tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _attr(value: object) -> str:
    """A number in full precision for a data- attribute (what a test reads back)."""
    return "" if value is None else esc(repr(value) if isinstance(value, float) else value)


def null_note(shifts: int) -> str:
    return (f"<p class=muted id=null-note>null: the same pair's statistic with the later layer's"
            f" sequences realigned {shifts} ways (each sequence against the k-th next one of its "
            "length, k = 1..K; k = 1 is the null model of <code>featstore stats --null</code>); "
            "z = (value − null mean) / null sd; p = (1 + #null values ≥ value) / (K + 1)</p>")


def causal_table(frame: pl.DataFrame, node: Node, root: str, site: Site) -> str:
    """Effects of ablating the feature (on later ones) and of earlier ones on it."""
    shown = [c for c in frame.columns if c not in ("layer_a", "feature_a", "layer_b", "feature_b")]
    head = "<tr><th>ablated</th><th>affected</th>" + "".join(f"<th>{esc(c)}</th>" for c in shown)
    rows = []
    for r in frame.iter_rows(named=True):
        a, b = (r["layer_a"], r["feature_a"]), (r["layer_b"], r["feature_b"])
        ends = [esc(f"L{n[0]}:{n[1]}") if n == node else site.feature_link(root, n) for n in (a, b)]
        cells = "".join(f"<td>{c}</td>" for c in ends) + "".join(
            f"<td>{esc(r[c])}</td>" for c in shown
        )
        rows.append(f"<tr>{cells}</tr>")
    return f"<table id=causal>{head}</tr>{''.join(rows)}</table>"


def logits_block(frame: pl.DataFrame | None) -> str:
    if frame is None:
        return "<p class=muted>no logit effects table (materialise logit_effects)</p>"
    lists = []
    for kind in ("promoted", "suppressed"):
        rows = frame.filter(pl.col("kind") == kind).sort("rank")
        items = "".join(f"<tr><td class=l><code>{esc(t)}</code></td><td>{e:+.3f}</td></tr>"
                        for t, e in zip(rows["text"], rows["effect"], strict=True))  # fmt: skip
        lists.append(f"<div><h3>{kind}</h3><table id=logits-{kind}>{items}</table></div>")
    return f"<div class=cols>{''.join(lists)}</div>"


def measure_form(action: str, measure: str, extra: str = "") -> str:
    options = "".join(
        f"<option{' selected' if m == measure else ''}>{m}</option>" for m in MEASURES
    )
    return (
        f'<form action="{action}" method=get>order by <select name=measure id=measure '
        f'onchange="this.form.submit()">{options}</select>{extra} <button>show</button></form>'
    )


def feature_page(view: FeatureView, measure: str, site: Site) -> str:
    root, node = "../../", (view.layer, view.feature)
    label = site.labels(node)
    mean_active = view.total / view.count if view.count else float("nan")
    summary = (f"<p id=summary>active on <b id=count>{view.count}</b> of <b id=n_tokens>"
               f"{view.n_tokens}</b> tokens (frequency <b id=frequency>{view.frequency:.4g}</b>); "
               f"mean when active {mean_active:.4g}</p>")  # fmt: skip
    concepts = "".join(f"<li>{esc(c)} (AUROC {a:.3f})</li>"
                       for c, a in zip(view.concepts["concept"], view.concepts["auroc"],
                                       strict=True))  # fmt: skip
    tokens = ", ".join(f"<code>{esc(t)}</code> ×{n}" for t, n in view.top_tokens)
    parts = [
        f"<h1>Feature L{view.layer}:{view.feature} <span class=lab id=label>{esc(label)}</span>"
        "</h1>",
        summary, f'<p><a id=graph-link href="{site.href(root, "graph", node)}">neighbourhood graph'
        "</a></p>",
        "<div class=cols><div><h2>Activation histogram</h2>", histogram_svg(view.histogram),
        f"</div><div><h2>Label</h2><p>concepts: </p><ul id=concepts>{concepts or '<li>none</li>'}"
        f"</ul><p>most frequent tokens among its strongest activations: <span id=top-tokens>"
        f"{tokens or 'none'}</span></p></div></div>",
        "<h2>Top-activating contexts</h2>", contexts_table(view.contexts),
        "<h2>Partners</h2>", measure_form(f"{view.feature}{site.ext}", measure),
        null_note(view.null_shifts),
    ]  # fmt: skip
    for p in view.partners:
        parts.append(f"<h3>{p.side} in layer {p.layer}</h3><div id=partners-{p.layer}>"
                     f"{partner_table(p.frame, measure, root, site)}</div>")  # fmt: skip
    if not view.partners:
        parts.append("<p class=muted>no merged pair statistics for this layer</p>")
    parts.append("<h2>Causal effects</h2>")
    parts.append(causal_table(view.causal, node, root, site) if view.causal.height
                 else "<p class=muted>not measured for this feature</p>")  # fmt: skip
    parts += ["<h2>Logit effects</h2>", logits_block(view.logits)]
    return page(f"L{view.layer}:{view.feature} {label}", "".join(parts), root, site)


# -- the neighbourhood graph -----------------------------------------------------------------------


def _positions(nb: Neighbourhood, width: int, height: int) -> dict[Node, tuple[float, float]]:
    layers = sorted({x for x, _ in nb.nodes})
    pos = {}
    for i, layer in enumerate(layers):
        column = [n for n in nb.nodes if n[0] == layer]
        x = 90 + (width - 240) * (i / max(len(layers) - 1, 1))
        for j, node in enumerate(column):
            pos[node] = (x, 50 + (height - 80) * ((j + 0.5) / len(column)))
    return pos


def graph_svg(
    nb: Neighbourhood, site: Site, root: str, width: int = 1100, height: int = 560
) -> str:
    pos = _positions(nb, width, height)
    lines = []
    values = nb.edges[nb.measure].to_list() if nb.edges.height else []
    finite = [v for v in values if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    for r in nb.edges.iter_rows(named=True):
        a, b = (r["layer_a"], r["feature_a"]), (r["layer_b"], r["feature_b"])
        if a not in pos or b not in pos:
            continue
        v = r[nb.measure]
        x = (v - lo) / (hi - lo) if v is not None and hi > lo else 1.0
        data = " ".join(f'data-{m}="{esc(r[m]) or "nan"}"' for m in MEASURES)
        ends = (
            f'x1="{pos[a][0]:.0f}" y1="{pos[a][1]:.0f}" x2="{pos[b][0]:.0f}" y2="{pos[b][1]:.0f}"'
        )
        lines.append(f'<line class=edge {ends} stroke="{colour(x)}" stroke-width="2.5" {data}>'
                     f"<title>{nb.measure} {esc(v)}</title></line>")  # fmt: skip
    nodes = []
    for node, (x, y) in pos.items():
        label = site.labels(node)
        centre = node == nb.centre
        ring = ' stroke="#c00" stroke-width="3"' if centre else ' stroke="#333"'
        circle = f'<circle cx="{x:.0f}" cy="{y:.0f}" r="{9 if centre else 7}" fill="#fff"{ring}/>'
        text = (f'<text x="{x + 12:.0f}" y="{y + 4:.0f}" font-size="12">L{node[0]}:{node[1]} '
                f'<tspan fill="#555">{esc(label[:28])}</tspan></text>')  # fmt: skip
        item = f'<g class=node data-layer="{node[0]}" data-feature="{node[1]}">{circle}{text}</g>'
        if site.exists(node):
            item = f'<a href="{site.href(root, "features", node)}">{item}</a>'
        nodes.append(item)
    heads = "".join(f'<text x="{pos[n][0]:.0f}" y="20" font-size="13" text-anchor="middle" '
                    f'font-weight="bold">layer {n[0]}</text>'
                    for n in pos if n == next(m for m in pos if m[0] == n[0]))  # fmt: skip
    return (f'<svg id=graph width="{width}" height="{height}" role="img">{heads}'
            f"{''.join(lines)}{''.join(nodes)}</svg>")  # fmt: skip


def graph_page(nb: Neighbourhood, site: Site) -> str:
    root, (layer, feature) = "../../", nb.centre
    extra = (
        f' at least <input name=threshold id=threshold size=5 value="{nb.threshold:g}" '
        'oninput="recolor()">'
    )
    body = (
        f"<h1>Neighbourhood of {site.feature_link(root, nb.centre)} "
        f"<span class=lab>{esc(site.labels(nb.centre))}</span></h1>"
        f"<p>the {len(nb.nodes) - 1} strongest partners by {esc(nb.measure)} (>= {nb.threshold:g})"
        " layer by layer; edge colour: the chosen measure, blue (low) to red (high); click a "
        "feature to open it</p>"
        + measure_form(f"{feature}{site.ext}", nb.measure, extra).replace(
            'onchange="this.form.submit()"', 'onchange="recolor()"')
        + graph_svg(nb, site, root)
    )  # fmt: skip
    return page(f"graph L{layer}:{feature}", body, root, site, SCRIPT)


# -- search and index ------------------------------------------------------------------------------


def results_list(results: list[tuple[Node, str]], site: Site, root: str) -> str:
    if not results:
        return "<p id=results class=muted>no feature found</p>"
    items = "".join(f"<li>{site.feature_link(root, node)} <span class=lab>{esc(why)}</span></li>"
                    for node, why in results)  # fmt: skip
    return f"<ol id=results>{items}</ol>"


def search_page(query: str, results: list[tuple[Node, str]], site: Site) -> str:
    body = f"<h1>Search: {esc(query)}</h1>{results_list(results, site, '')}"
    return page(f"search {query}", body, "", site)


def index_page(layers: dict[int, list[Node]], site: Site, note: str = "") -> str:
    parts = ["<h1>Features</h1><p>Search by feature id (<code>7:123</code>), by token (features "
             "whose strongest activations are on it) or by concept.</p>", note]  # fmt: skip
    for layer, nodes in layers.items():
        parts.append(
            f"<h2>Layer {layer}</h2>{results_list([(n, site.labels(n)) for n in nodes], site, '')}"
        )
    return page("featstore explorer", "".join(parts), "", site)
