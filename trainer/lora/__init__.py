"""ZIT LoRA library: one canonical form, every community dialect, block weights, merge, inspect."""
