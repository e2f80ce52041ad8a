"""Helpers the stages share: task distribution, progress bars, image listing and inputs, results."""
