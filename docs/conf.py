"""Sphinx configuration for pyro_scorevi.

Build with ``scripts/build-docs.sh`` (or ``sphinx-build -W --keep-going -b html docs
docs/_build/html``). Environment variables read here:

``SCOREVI_NB_EXECUTION``
    myst-nb execution mode for the tutorials: ``force`` (default: every build executes every
    tutorial, so a broken tutorial fails the build), ``cache`` (re-execute only changed
    notebooks) or ``off``.
``SCOREVI_TUTORIAL_SCALE``
    read by the tutorials themselves; ``small`` (set by ``scripts/build-docs.sh``) shrinks data
    sets and step counts so that the whole build runs in minutes on two CPU cores.
``SCOREVI_INTERSPHINX``
    ``auto`` (default): link to the Pyro, NumPyro, PyTorch, JAX and ArviZ docs when their
    inventories are reachable (probed with a one-second timeout), and build without cross-project
    links otherwise; ``1``: always try (an unreachable inventory is then a warning, hence an
    error under ``-W``); ``0``: never.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyro_scorevi  # noqa: E402

project = "pyro_scorevi"
author = "pyro_scorevi developers"
copyright = "2026, pyro_scorevi developers"
release = pyro_scorevi.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]

# -- autodoc / napoleon --------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
# ``Attributes:`` sections become ``:ivar:`` fields, so they do not clash with the members that
# autodoc documents (NamedTuple fields would otherwise be described twice).
napoleon_use_ivar = True

# -- MyST / myst-nb --------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "substitution"]
# The defaults quoted on the algorithm page come from the code, so the page cannot drift.
from pyro_scorevi import defaults as _defaults  # noqa: E402

myst_substitutions = {
    name: repr(getattr(_defaults, name))
    for name in dir(_defaults)
    if name.isupper() and not name.startswith("_")
}
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("SCOREVI_NB_EXECUTION", "force")
nb_execution_timeout = int(os.environ.get("SCOREVI_NB_TIMEOUT", "900"))
nb_execution_raise_on_error = True  # a broken tutorial fails the build
nb_execution_show_tb = True
nb_execution_excludepatterns: list[str] = []
nb_merge_streams = True

# -- intersphinx -----------------------------------------------------------------------------------
_INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "pyro": ("https://docs.pyro.ai/en/stable/", None),
    "numpyro": ("https://num.pyro.ai/en/stable/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
    "jax": ("https://jax.readthedocs.io/en/latest/", None),
    "arviz": ("https://python.arviz.org/en/stable/", None),
}


def _reachable(url: str, timeout: float = 1.0) -> bool:
    host = urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _intersphinx_mapping() -> dict:
    # An unreachable inventory is an untyped Sphinx warning that ``suppress_warnings`` cannot
    # silence, so under ``-W`` an offline build would fail: keep only the reachable projects.
    mode = os.environ.get("SCOREVI_INTERSPHINX", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return {}
    if mode in ("1", "on", "true", "yes"):
        return dict(_INTERSPHINX)
    return {k: v for k, v in _INTERSPHINX.items() if _reachable(v[0])}


intersphinx_mapping = _intersphinx_mapping()
intersphinx_timeout = 5

# -- HTML ------------------------------------------------------------------------------------------
try:
    import sphinx_rtd_theme  # noqa: F401

    html_theme = "sphinx_rtd_theme"
except ImportError:  # pragma: no cover - the docs extra installs it
    html_theme = "alabaster"
html_title = f"pyro_scorevi {release}"
html_static_path: list[str] = []


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    # NamedTuple fields are properties whose docstring is "Alias for field number k"; the
    # class docstring's ``Attributes:`` section already describes them.
    doc = getattr(obj, "__doc__", None) or ""
    if doc.startswith("Alias for field number"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
