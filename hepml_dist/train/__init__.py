"""The training engine: Ray launch, the per-worker training loop, parallel wrapping, PCGrad, checkpoints."""
