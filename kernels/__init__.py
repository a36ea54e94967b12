"""Triton kernels for PixArt-alpha blocks, imported as `pixart_fast.kernels`."""
