"""Models: the registry (registry.py), CIFAR ResNets, safe checkpoints that restore pruned shapes."""
