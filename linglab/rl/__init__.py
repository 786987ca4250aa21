"""RL post-training (SPEC §5): policy losses, train-inference mismatch corrections and verifiable rewards."""
