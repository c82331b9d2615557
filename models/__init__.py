"""Model code: HSA, VLM loading and generation, the embedded default models. No UI, no database."""
