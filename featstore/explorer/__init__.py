"""The explorer wing: `featstore serve`, a feature explorer over a store, and its static export.

`reads` (what one feature's page needs, by indexed queries: the store's SQL index, the pair
statistics' Parquet files with a feature filter, the pipeline's tables), `graphview` (a
feature's neighbourhood across layers as inline SVG), `pages` (the HTML: escaped, no script
from outside, no external request), `app` (the Starlette app, `serve` and `export`).

May import everything below it (the ground floor and the store, sources, stats and analysis
wings). It never writes to the store: `export` writes only the folder it is given, and what
the explorer derives to read fast lives beside the store in the home (`sql_index/`,
`pair_index/`, rebuilt when stale).
"""
