"""Built-in kernel backends of kvsieve (registered through entry points)."""
