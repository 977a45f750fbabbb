"""Named, reusable search spaces for studies."""
