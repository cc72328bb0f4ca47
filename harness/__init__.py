"""optimem harness: real Trainer jobs per optimizer, measured (memory by phase, optimizer state, throughput)."""
