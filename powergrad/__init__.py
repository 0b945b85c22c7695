"""powergrad: reproduce the PowerGrad Transform (PGT) paper on timm models with Hydra, DALI and wandb."""

__version__ = "0.1.0"
