"""Training data. `shapes`: the synthetic "shapes world" the shipped tiny model learns."""
