"""`featstore serve`: the explorer as a Starlette app, and the same pages as a static export.

Routes: `/` (index), `/features/{layer}/{id}` (`?measure=`), `/graph/{layer}/{id}`
(`?measure=&threshold=`), `/search?q=`. Every response forbids requests outside the site
(Content-Security-Policy); bad input is a one-line page with status 400 or 404. The export writes
`index.html`, `search.html` (searching the exported features in the page), and
`features/L/ID.html` and `graph/L/ID.html` of the chosen features, each file atomically.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import polars as pl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from featstore.analysis.cards import busiest_features
from featstore.defaults import DEFAULT_MEASURE, NULL_SHIFTS, SERVE_HOST, SERVE_PORT
from featstore.errors import FeatstoreError
from featstore.explorer import pages
from featstore.explorer.graphview import neighbourhood
from featstore.explorer.reads import MEASURES, Explorer, Search, check_measure_name, labeller
from featstore.explorer.text import esc
from featstore.files import atomic_file
from featstore.store import spec
from featstore.store.local import Store

Node = tuple[int, int]
DEFAULT_HOST, DEFAULT_PORT = SERVE_HOST, SERVE_PORT
CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "img-src 'self' data:; form-action 'self'; base-uri 'none'")  # fmt: skip
DEFAULT_THRESHOLD = 0.1


def check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise FeatstoreError(f"port must be an integer in 1..65535, got {port!r}")
    return port


def home_features(ex: Explorer, n: int) -> list[Node]:
    """The `n` busiest features of the graph, else the first features of each layer."""
    path = ex.store.home / spec.GRAPH_DIR / "edges.parquet"
    if path.exists():
        keys = busiest_features(pl.scan_parquet(path), n)
        if keys:
            return keys
    per = max(n // max(len(ex.layers), 1), 1)
    return [(x, f) for x in ex.layers for f in range(min(per, ex.d_sae(x)))]


def by_layer(nodes: Sequence[Node]) -> dict[int, list[Node]]:
    out: dict[int, list[Node]] = {}
    for node in sorted(nodes):
        out.setdefault(node[0], []).append(node)
    return out


def _measure(request: Request) -> str:
    measure = request.query_params.get("measure", DEFAULT_MEASURE)
    check_measure_name(measure)
    return measure


def _threshold(request: Request) -> float:
    text = request.query_params.get("threshold", str(DEFAULT_THRESHOLD))
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise FeatstoreError(f"threshold must be a finite number, got {text[:40]!r}")
    return value


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status, headers={"Content-Security-Policy": CSP})


def create_app(
    store: Store, n_index: int = 40, warm: bool = False, null_shifts: int = NULL_SHIFTS
) -> Starlette:
    """The explorer over `store` (read only); `warm`: bring the SQL index in step with the
    store in the background from the start (after an extraction it is rebuilt), so that the
    first reader waits less."""
    ex = Explorer(store, null_shifts=null_shifts)
    if warm:
        threading.Thread(target=ex.warm, daemon=True).start()
    site = pages.Site(labels=labeller(ex))
    search = Search(ex)

    def answer(make, request: Request) -> HTMLResponse:
        try:
            return _html(make(request))
        except FeatstoreError as exc:
            status = 404 if "not in store" in str(exc) or "outside" in str(exc) else 400
            return _html(f"<!DOCTYPE html><title>error</title><p id=error>{esc(exc)}</p>", status)

    def feature(request: Request) -> str:
        p = request.path_params
        measure = _measure(request)
        return pages.feature_page(ex.feature(p["layer"], p["feature"], measure), measure, site)

    def graph(request: Request) -> str:
        p = request.path_params
        nb = neighbourhood(ex, p["layer"], p["feature"], _measure(request), _threshold(request))
        return pages.graph_page(nb, site)

    def find(request: Request) -> str:
        query = request.query_params.get("q", "")
        return pages.search_page(query, search(query), site)

    def index(request: Request) -> str:
        keys = home_features(ex, n_index)
        ex.label_tokens(keys)
        return pages.index_page(by_layer(keys), site)

    def route(path: str, make) -> Route:
        return Route(path, lambda request: answer(make, request))

    return Starlette(routes=[
        route("/", index), route("/index.html", index), route("/search", find),
        route("/features/{layer:int}/{feature:int}", feature),
        route("/graph/{layer:int}/{feature:int}", graph),
    ])  # fmt: skip


def serve(
    store: Store, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
    null_shifts: int = NULL_SHIFTS,
) -> None:  # fmt: skip
    import uvicorn

    check_port(port)
    app = create_app(store, warm=True, null_shifts=null_shifts)
    uvicorn.run(app, host=host, port=port, log_level="warning")


# -- the static export -----------------------------------------------------------------------------

SEARCH_SCRIPT = """var q=new URLSearchParams(location.search).get('q')||'';
document.getElementById('q').value=q;document.getElementById('query').textContent=q;
var w=q.trim().toLowerCase().replace(/^l/,'').replace('/',':'),out=[];
FEATURES.forEach(function(f){var id=f[0]+':'+f[1];if(w&&(id===w||String(f[1])===w||
f[2].toLowerCase().indexOf(w)>=0)){out.push(f);}});var ol=document.getElementById('results');
out.forEach(function(f){var li=document.createElement('li'),a=document.createElement('a');
a.href='features/'+f[0]+'/'+f[1]+'.html';a.textContent='L'+f[0]+':'+f[1];li.appendChild(a);
li.appendChild(document.createTextNode(' '+f[2]));ol.appendChild(li);});"""


def _write(path: Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def export(store: Store, out: str | os.PathLike[str], features: Sequence[Node] | None = None,
           n: int = 50, measure: str = DEFAULT_MEASURE,
           null_shifts: int = NULL_SHIFTS) -> list[Path]:  # fmt: skip
    """Write the pages of `features` (default: the `n` busiest) as a static site into `out`,
    partners ordered and the graph coloured by `measure` (a `pair_stats` column), each partner
    against `null_shifts` alignments of the null model."""
    check_measure_name(measure)
    ex = Explorer(store, null_shifts=null_shifts)
    keys = list(dict.fromkeys(features)) if features else home_features(ex, n)
    for key in keys:
        ex.check(*key)
    chosen, out = set(keys), Path(out)
    site = pages.Site(".html", lambda node: node in chosen, labeller(ex))
    written = [_write(out / "index.html", pages.index_page(by_layer(keys), site))]
    for layer, feature in keys:
        view = ex.feature(layer, feature, measure)
        written.append(_write(out / "features" / str(layer) / f"{feature}.html",
                              pages.feature_page(view, measure, site)))  # fmt: skip
        nb = neighbourhood(ex, layer, feature, measure, DEFAULT_THRESHOLD)
        written.append(_write(out / "graph" / str(layer) / f"{feature}.html",
                              pages.graph_page(nb, site)))  # fmt: skip
    table = json.dumps([[x, f, site.labels((x, f))] for x, f in keys]).replace("<", "\\u003c")
    body = "<h1>Search: <span id=query></span></h1><ol id=results></ol>"
    script = f"var FEATURES={table};{SEARCH_SCRIPT}"
    written.append(_write(out / "search.html", pages.page("search", body, "", site, script)))
    return written


__all__ = ["MEASURES", "create_app", "export", "serve"]
