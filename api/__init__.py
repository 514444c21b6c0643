"""The HTTP API: falcon resources, middleware and error rendering."""
