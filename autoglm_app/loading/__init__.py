"""Start-up only: checkpoints (local, hub, cache), quantization, device plans and fused-expert packing.

Nothing here runs on the request path; the engine gets a ``LoadedModel`` and never imports this
package while serving.
"""
