"""lmlab's Optuna sweeper (``lmlab train -m hydra/sweeper=optuna ...``): see ``optuna_sweeper``."""
