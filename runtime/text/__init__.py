"""Text: the tokenizer, the streaming detokenizer and chat templates."""
