"""First-party qi plugins; each subpackage is registered through its own ``qi.plugins`` entry point."""
