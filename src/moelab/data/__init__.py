"""Everything between raw text and training batches: corpus, download, tokenizers, tokenize, loader."""
