"""Real models whose attention inputs the model input sources capture: the text they read, the
verified cache of what they computed, each model's own forward pass (minilm, smollm2) one
attention at a time, and its driver (layers)."""
