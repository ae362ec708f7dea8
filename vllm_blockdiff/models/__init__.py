"""Networks and weight loading for the served checkpoint families."""
