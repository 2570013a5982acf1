"""Text: the multimodal tokenizer and the chat templates (loss masks, image slots)."""
