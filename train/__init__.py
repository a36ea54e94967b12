"""The trainer and its stage recipes, imported as `pixart_fast.train`."""
