"""The algorithm in pure torch: scoring (paper steps 1-4) and selection (step 5)."""
