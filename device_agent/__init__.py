"""The Tabiji device agent that runs on staff laptops (light dependencies: httpx, cryptography)."""
