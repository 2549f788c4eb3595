"""Exchange: stack files, checkpoints, BioImage.IO packages and the TorchScript guard."""
