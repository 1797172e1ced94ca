"""The user's workload: the model and data factories a space file names (``registry``),
the model with its trained baseline (``models``) and the data splits (``data``)."""
