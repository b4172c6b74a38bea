"""make bench: `python -m scripts.bench` runs every benchmark here and prints one table of ratios."""
