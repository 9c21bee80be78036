"""prune / prune_pass: check, slice parameters and optimizer state in one transaction, install the forwards, check again; the exact fallback forwards; execution_report."""
