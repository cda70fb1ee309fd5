"""The serving engine: the request queue and worker, input conversion, generation, probes, remote and ASR backends."""
