"""How `store_v1`, `store_v2` and `store_v3` were built (tests/test_frozen_stores.py): with the
featstore of spec version 1 (commit 62a0980), 2 (commit fecad02) or 3 (commit b76d73d) first on
the path, e.g.

    git archive fecad02 featstore | tar -x -C /tmp/v2
    cd /tmp/v2 && PYTHONPATH=$PWD python build_old_store.py 2 /tmp/out2   # then out2/store.zarr

Shard s0 (24 tokens, sequences of 8), layers 6 and 7 (16 features), a vocabulary of 32 words
(two non-ASCII), and the pair sums of 6-7. Seeded.
"""

import sys

import numpy as np
import polars as pl
import scipy.sparse as sp

version, home = sys.argv[1], sys.argv[2]
if version == "1":
    from featstore.pairs import update_shard_pairs

    from featstore.store import open_store
else:
    from featstore.stats.shardsums import update_shard_pairs
    from featstore.store.home import open_store
store = open_store(home, create=True)
rng = np.random.default_rng(7)
store.write_vocab([f"tok{i}" for i in range(30)] + ["caf\u00e9", "\u00fcber"])
for shard, n in (("s0", 24),):
    seq_len = 8
    table = {"seq": np.arange(n) // seq_len, "pos": np.arange(n) % seq_len}
    store.write_tokens(shard, pl.DataFrame({**table, "token": rng.integers(0, 32, n)}))
    for layer in (6, 7):
        m = sp.random(n, 16, density=0.3, random_state=rng, format="csr", dtype=np.float32)
        m.data = (m.data * 4 + 0.01).astype(np.float32)
        store.write_activations(layer, shard, m, {"source": "test"})
update_shard_pairs(store, 6, 7, "s0")
print(store.layers(), store.token_shards())
