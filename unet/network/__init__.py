"""The network: configs, sizes, the model and its layers, losses, the device."""
