"""The torch-free base every layer shares: the error type, the command-line edge, atomic files, formats."""
