"""teranprep: image folder + captions -> region features -> splits -> a trained, evaluated TERAN model."""

__version__ = "0.1.0"
