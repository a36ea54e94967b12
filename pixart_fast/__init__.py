"""pixart_fast: a lean PixArt-alpha model, Triton kernels and a three-stage trainer."""
