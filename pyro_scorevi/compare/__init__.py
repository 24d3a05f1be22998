"""Side-by-side comparison of ``ScoreProximalSVI`` and ELBO SVI (the ``pyro-scorevi`` command).

Modules: :mod:`~pyro_scorevi.compare.problems` (the registry of problems),
:mod:`~pyro_scorevi.compare.models` (Pyro and NumPyro models), :mod:`~pyro_scorevi.compare.metrics`,
:mod:`~pyro_scorevi.compare.runner` (budgets, seeds, timing) and
:mod:`~pyro_scorevi.compare.report` (table, JSON, plots). Needs the ``compare`` extra:
``pip install "pyro_scorevi[compare]"``.
"""
