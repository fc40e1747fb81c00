"""fastattn's benchmark suite: `python -m bench` (what `make bench` runs). See bench/README.md."""
