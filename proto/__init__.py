"""The gRPC contract (.proto and generated modules; arrives with the serving layer)."""
