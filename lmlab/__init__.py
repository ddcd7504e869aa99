"""lmlab: a command-line bench for the science of language-model pretraining."""

__version__ = "0.1.0"
