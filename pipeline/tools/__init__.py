"""User tools around training: `profile` (cost), `compare` (runs side by side), `visualize`."""
