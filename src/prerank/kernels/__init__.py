"""Optional native serving kernels (C, compiled on first use); every caller has a PyTorch fallback."""
