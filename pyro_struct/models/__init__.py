"""Example models: the arithmetic circuit, linear-Gaussian networks, an HMM, an AR(1) state-space
model with global parameters, hierarchical models (one plate, and nested plates with a closed-form
posterior) and the stochastic deconvolution of Weilbach et al.

Every model declares its observed sites as ``model.observed_sites``, which
:func:`~pyro_struct.trace_model` and :class:`~pyro_struct.StructuredGuide` use as their default
``observed=``, so the models can be compiled without data.
"""

from .circuit import arithmetic_circuit
from .deconvolution import deconvolution
from .hierarchical import hierarchical, nested_hierarchical, nested_hierarchical_posterior
from .hmm import hmm
from .linear_gaussian import LinearGaussianNetwork, data_dir, gaussian_kl
from .state_space import ar1_state_space

__all__ = [
    "arithmetic_circuit",
    "deconvolution",
    "hierarchical",
    "nested_hierarchical",
    "nested_hierarchical_posterior",
    "hmm",
    "ar1_state_space",
    "LinearGaussianNetwork",
    "gaussian_kl",
    "data_dir",
]
