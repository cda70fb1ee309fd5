"""The serving engine: loading, device planning, generation, probes and the request queue."""
