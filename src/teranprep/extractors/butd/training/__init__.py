"""Training the BUTD detector: its losses (losses.py), VOC-style AP (ap.py) and the training steps (engine.py)."""
