"""onnxopt's built-in passes, registered through the `onnxopt` entry point group like any plugin."""
