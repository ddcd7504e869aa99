"""lmlab's local launcher for Hydra sweeps (``lmlab train -m launcher=local ...``): see ``local_launcher``."""
