"""The model-agnostic engine: config, topology, parallel layers, pipeline, optimizer, data, trainer."""
