"""The seller's YAML: `model` (the frozen dataclasses every layer reads), `tables` (the field
tables that are also the JSON Schema) and `loader` (YAML -> model, every error naming its key)."""
