"""What turns files and messages into model inputs: chat template, tokenizer, images, videos."""
