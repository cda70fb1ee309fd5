"""ShapesWorld: deterministic synthetic image/speech/text data for the tiny demo model."""
