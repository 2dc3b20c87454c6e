"""Training data: dataset formats, chat templates and loss masks, tokenized datasets."""
