"""Neural optimal transport: the Monge gap, Schrödinger bridges and their Gaussian ground truths."""

from otcore.neural import gaussian
from otcore.neural.benchmark import MixtureBridge
from otcore.neural.enot import ENOT
from otcore.neural.fit_map import ResidualMLP, fit_monge_map
from otcore.neural.lightsb import LightSB
from otcore.neural.monge_gap import monge_gap

__all__ = ["ENOT", "LightSB", "MixtureBridge", "ResidualMLP", "fit_monge_map", "gaussian", "monge_gap"]
