"""The `meshca` command line, one module per command group."""
