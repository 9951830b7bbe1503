"""Putting a gateway together and running it: the shared context assembled from the config
(`assemble`), hot reload (`reload`), the in-process gateway of `keyward run` (`embedded`) and the
sidecar of `keyward serve` (`sidecar`). The data planes (`planes/`) and the pod's namespaces,
privileges and contract (`pod/`) are the parts; this package is where they meet."""
