"""Real models whose attention inputs the model input sources capture: the text they read, the
verified cache of what they computed, and each model's own forward pass (minilm, smollm2)."""
