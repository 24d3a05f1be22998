"""Default hyper-parameters shared by the Pyro and NumPyro backends.

Backend-agnostic (no torch, no jax). Each value carries its reason; the sweeps behind them are
recorded in ``docs/algorithm.md`` with the command that reproduces them.
"""

#: S, particles per step; one antithetic pair (theta = m +/- s*eps) cancels the odd part of the
#: score noise in the mean update at the cost of two gradient evaluations.
NUM_PARTICLES = 2

#: lambda, weight of KL(q_t || q): an inverse step size (the mean moves by ~ 2 s^2 g / lambda).
PROX_WEIGHT = 100.0

#: Draw particles in antithetic pairs (m + s*eps, m - s*eps), sharing one mini-batch.
ANTITHETIC = True

#: (precision, mean) alternations of the closed-form diagonal step. Two (the joint minimiser to
#: well below the Monte Carlo noise) are stable on Bayesian neural networks: on the digits MLP
#: (S = 2, lambda = 100, 2000 steps) one alternation let a few scales drift above the prior sd
#: and test accuracy fell to 0.53, two gave 0.96. The second alternation couples the precision
#: to the squared mean step, which under heavy subsampling (N/B = 62) shrinks the variances by a
#: bias of order 1/lambda (0.61x at lambda = 100, 0.94x with PolynomialGrowth(30, 100));
#: one alternation has no such bias (1.0x). See docs/algorithm_sweeps.md.
NUM_ALTERNATIONS = 2

#: Inner optimiser steps for families without a closed form (low-rank, full-rank); must be > 1,
#: since the KL term has zero gradient at q = q_t.
NUM_INNER_STEPS = 5

#: Learning rate of the default inner optimiser (Adam) for those families.
INNER_LR = 1e-2
