"""Helpers the tests share (tests never import one another): small chunks and namespaces, real agents,
controllers and clusters to run, and readers of what those leave behind (segment files, metrics)."""
