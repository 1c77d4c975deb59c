"""collecting."""
