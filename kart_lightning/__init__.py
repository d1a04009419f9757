"""kart_lightning: IMPALA (V-trace actor-critic) on PyTorch Lightning, for kart racing on the SNES
and any stable-retro, Atari or gymnasium game."""

__version__ = "0.1.0"
