"""The semantic query cache: earlier complete answers, found by meaning, within hard scope partitions."""
