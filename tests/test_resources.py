"""The Dagster resource from the environment: the user's text, store, source and layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from featstore.errors import FeatstoreError
from pipelines.resources import ENV_VARS, LAYERS_VAR, from_env

REPO = Path(__file__).resolve().parents[1]
SHOW = """
import json
from pipelines.definitions import defs
r = defs.resources["featstore"]
unresolved = {k: getattr(r, k).env_var_name for k in ("home", "source", "text_dir")}
x = r.process_config_and_initialize()
cfg = x.extract_config()
print(json.dumps({"unresolved": unresolved, "home": str(x.home_path()), "layers": x.layers,
                  "source": cfg.source, "text": str(x.text_folder()), "device": cfg.device}))
"""


def test_the_definitions_take_text_store_source_and_layers_from_the_environment(tmp_path):
    text = tmp_path / "my-text"
    text.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATSTORE_")}
    env |= {
        "PYTHONPATH": str(REPO),
        "FEATSTORE_HOME": str(tmp_path / "store"),
        "FEATSTORE_TEXT_DIR": str(text),
        "FEATSTORE_SOURCE": "gpt2-small",
        "FEATSTORE_LAYERS": "7, 8",
        "FEATSTORE_DEVICE": "cuda",
    }
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", SHOW], env=env, capture_output=True, text=True,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    # Dagster EnvVars in the definitions (the UI shows the variable), values once resolved.
    assert got["unresolved"] == {
        "home": "FEATSTORE_HOME", "source": "FEATSTORE_SOURCE", "text_dir": "FEATSTORE_TEXT_DIR"
    }  # fmt: skip
    assert got["home"] == str(tmp_path / "store") and got["text"] == str(text)
    assert got["source"] == "gpt2-small" and got["layers"] == [7, 8] and got["device"] == "cuda"


def test_without_the_environment_the_defaults_hold():
    resource = from_env({}).process_config_and_initialize()
    assert resource.source == "tiny" and resource.layers == [6, 7, 8, 9]
    assert resource.home is None and resource.text_dir is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({LAYERS_VAR: "6,x"}, LAYERS_VAR),
        ({LAYERS_VAR: "6;7"}, LAYERS_VAR),
        ({LAYERS_VAR: "3 6"}, LAYERS_VAR),
        ({ENV_VARS["source"]: "no-such-source"}, ENV_VARS["source"]),
    ],
)
def test_a_bad_variable_is_one_line_naming_it(env, named):
    with pytest.raises(FeatstoreError) as exc:
        from_env(env)
    assert named in str(exc.value) and "\n" not in str(exc.value)


LOAD_QUIETLY = """
import warnings
import dagster as dg
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    from pipelines.definitions import defs
    defs.get_repository_def()
    defs.resolve_implicit_global_asset_job_def()
beta = [str(w.message) for w in seen if issubclass(w.category, dg.BetaWarning)]
print(beta)
"""


def test_loading_the_definitions_prints_no_beta_warning(tmp_path):
    """A user cannot act on Dagster's beta warnings about featstore's own use of beta APIs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATSTORE_")}
    env |= {"PYTHONPATH": str(REPO), "FEATSTORE_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_QUIETLY], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "[]"
