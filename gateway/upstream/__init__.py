"""How the gateway reaches upstreams: where a verified name is dialled (`upstream.resolve`, the
configured name servers), the private-address guard on every address about to be connected
(`routes`), the one TLS context upstream connections verify with (`tls`), and aiohttp
connectors that use both (`connector`). The data planes, the OAuth token minter and the DNS
plane all leave through here, so every way out is checked the same way.

Nothing is imported here: `routes` and `tls` stay free of aiohttp for the commands that never
open an upstream connection."""
