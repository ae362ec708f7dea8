"""Pure decoding policies over logits: no vLLM imports, unit-testable alone."""
