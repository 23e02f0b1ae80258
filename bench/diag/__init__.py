"""One-off GPU diagnostics behind findings of the prepared GPU check (bench/results/gpu-check-h200/)."""
