"""The frozen IR: couplings and their slices and sites, plans, channel labels, kept positions, and the removal record on a pruned model's modules."""
