"""PyTorch bridge: custom ops with autograd, layers and models (work in progress)."""
