"""Built-in compression policies of kvsieve (registered through entry points)."""
