"""gRPC front door: prefix-aware balancing and failover across replicas (arrives with the serving layer)."""
