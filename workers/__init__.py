"""Background work: scheduler, routing, providers, webhook delivery."""
