"""`python -m onnxopt` runs the CLI."""

from onnxopt.cli import main

main()
