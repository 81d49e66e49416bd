"""The Ray Serve backend: a deployment (one replica per GPU) and the worker that calls it."""
