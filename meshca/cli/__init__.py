"""The `meshca` command line: main.py (the parser; ca init, dev, serve, demo) and a module per other command group."""
