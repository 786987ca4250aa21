"""RL post-training (SPEC §5): policy losses, train-inference mismatch corrections, verifiable rewards, the rollout
engine with its C3PO++ pool (`rollout`), the trainer (`trainer`, `linglab rl`) and its report (`report`)."""
