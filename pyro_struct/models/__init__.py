"""Example models: the arithmetic circuit, linear-Gaussian networks, an HMM, a hierarchical model
and the stochastic deconvolution of Weilbach et al."""

from .circuit import arithmetic_circuit
from .deconvolution import deconvolution
from .hierarchical import hierarchical
from .hmm import hmm
from .linear_gaussian import LinearGaussianNetwork, gaussian_kl, shared_data_dir

__all__ = [
    "arithmetic_circuit",
    "deconvolution",
    "hierarchical",
    "hmm",
    "LinearGaussianNetwork",
    "gaussian_kl",
    "shared_data_dir",
]
