"""Training objectives sharing one backbone, train step, evaluator and checkpoint format.

  replaid  continuous diffusion on learned embeddings (the method; default)
  ar       autoregressive: the same DiT with causal attention, exact NLL
  mdlm     masked (absorbing-state) discrete diffusion, NELBO evaluation
  duo      uniform-state discrete diffusion (Duo's ELBO), NELBO training and evaluation

mdlm and duo share `discrete.DiscreteDiffusion` (time lattice, bound estimator, sampler plumbing).
"""

from replaid_jax.objectives import ar
from replaid_jax.objectives import base
from replaid_jax.objectives import duo
from replaid_jax.objectives import mdlm
from replaid_jax.objectives import replaid

REGISTRY = {"replaid": replaid.RePlaid, "ar": ar.AR, "mdlm": mdlm.MDLM, "duo": duo.Duo}
Objective = base.Objective
SampleRequest = base.SampleRequest


def make(c) -> base.Objective:
  """The objective named by `c.objective` for a converted config."""
  if c.objective not in REGISTRY:
    raise ValueError(f"unknown objective {c.objective!r}; choose one of {sorted(REGISTRY)}.")
  return REGISTRY[c.objective](c)
