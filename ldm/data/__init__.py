"""Training data. `shapes`: the synthetic "shapes world" the shipped tiny model learns;
`codec`: generic pictures an autoencoder trains on besides its world; `folder`: your own
captioned images."""
