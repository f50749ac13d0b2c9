"""The project's common library: names, wire schemas, config, NATS bootstrap, providers, metrics."""
