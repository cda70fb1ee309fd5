"""The Gradio page: chat with reasoning, caption-focus heatmaps, expert routing, model info and QA export.

``mount_ui(app, engine, settings)`` mounts it on the server's FastAPI app; it renders
the engine's event stream and never calls the model.
"""
