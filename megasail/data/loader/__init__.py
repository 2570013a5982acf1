"""The training data loader: config, curriculum, packing, DP balancing, workers, model-parallel loader."""
