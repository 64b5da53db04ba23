"""neuronatlas: neuron-interpretability experiments of five papers as one reproducible grid."""

__version__ = "0.1.0"
