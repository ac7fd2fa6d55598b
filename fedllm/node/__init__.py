"""The node side of a federation, Flower-free: its policy, its privacy guard, its reply cache."""
