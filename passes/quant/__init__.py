"""quant pass (in progress)."""
