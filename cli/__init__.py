"""The `molre-node` command line: thin typer commands that call molre/, storage/ and node/."""
