"""Model conversion into a save_pretrained directory (`tintc convert-gguf`)."""
