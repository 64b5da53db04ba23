"""The neuron atlas: every result of the grid, neuron by neuron, as a static site that opens from disk."""
