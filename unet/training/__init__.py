"""Training: the loop, live fine-tuning, data, augmentation, labels, the forest, the estimate, synthetic stacks."""
