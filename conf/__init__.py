"""centerx's Hydra configs, installed as the package `centerx.conf` (the CLI reads them with
`pkg://centerx.conf`, so an installed centerx works from any directory)."""
