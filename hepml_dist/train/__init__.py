"""The training engine: Ray launch, the per-worker training loop, the DDP/DeepSpeed engines applied from outside,
PCGrad, optimizers, checkpoints. Only the CLI, the launchers and the tuner import it."""
