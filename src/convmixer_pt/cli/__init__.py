"""The command lines: thin wrappers over the package, each printing a user error as one line."""
