"""The pod's netfilter rules: rendered sans-IO in `rules`, installed and checked by `apply`."""
