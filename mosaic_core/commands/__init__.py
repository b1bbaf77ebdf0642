"""One module per CLI command; each defines `register(subparsers)` setting `func(args) -> int`."""
