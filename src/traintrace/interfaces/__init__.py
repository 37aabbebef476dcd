"""Layer 9 — the command line, the demo and the HTML report."""
