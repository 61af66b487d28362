"""revsnn_triton: memory-efficient reversible spiking neural networks on fused Triton kernels."""
__version__ = "0.1.0"
