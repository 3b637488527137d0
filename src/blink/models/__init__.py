"""Model families, weight loading, tokenizers and the registry of servable models."""
