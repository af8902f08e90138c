"""Model parallelism: tensor-parallel layers, pipeline stages, data-parallel reduction, WTA-CRS."""
