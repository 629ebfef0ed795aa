"""The device-aggregator contract: the typed values both sides exchange and check."""
