"""Everything between the person and the models: store, alignment, runs, training, the UI."""
