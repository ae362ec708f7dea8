"""Test helpers: tiny random checkpoints in the published BD3LM / SDLM layouts."""
