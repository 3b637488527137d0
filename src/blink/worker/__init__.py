"""A replica: loads and warms a model, then drives its engine from the bus."""
