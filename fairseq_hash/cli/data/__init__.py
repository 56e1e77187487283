"""The data the tools train on: the built-in corpus, language-modelling and seq2seq data-bins."""
