"""What every layer may import: the user-error type and the logical-axis sharding helpers."""
